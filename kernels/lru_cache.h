#pragma once
// A map that keeps at most `capacity` entries and evicts the least recently used one: for caches
// keyed by shapes that can keep changing (GEMM plans under MoE, whose row counts vary every step;
// attention graphs), so that their memory stays bounded however many shapes a run meets.
#include <cstddef>
#include <iterator>
#include <list>
#include <map>
#include <stdexcept>
#include <utility>

namespace fastllm {

template <class Key, class Value>
class LruCache {
 public:
  explicit LruCache(std::size_t capacity) : capacity_(capacity) {
    if (capacity == 0) throw std::invalid_argument("LruCache: capacity 0, expected at least 1");
  }

  // The value for key, or null; a hit makes the entry the most recently used. The pointer stays
  // valid until the entry is evicted or replaced.
  Value* find(const Key& key) {
    const auto found = index_.find(key);
    if (found == index_.end()) return nullptr;
    items_.splice(items_.begin(), items_, found->second);
    return &found->second->second;
  }

  // Stores value under key (replacing an entry of that key) as the most recently used entry,
  // evicting the least recently used one when the cache is full.
  Value& insert(const Key& key, Value value) {
    if (const auto found = index_.find(key); found != index_.end()) {
      items_.erase(found->second);
      index_.erase(found);
    } else if (items_.size() == capacity_) {
      index_.erase(items_.back().first);
      items_.pop_back();
      ++evictions_;
    }
    items_.emplace_front(key, std::move(value));
    index_.emplace(key, items_.begin());
    return items_.front().second;
  }

  std::size_t size() const { return items_.size(); }
  std::size_t capacity() const { return capacity_; }
  // Entries dropped to make room since the cache was made.
  std::size_t evictions() const { return evictions_; }

 private:
  using Items = std::list<std::pair<Key, Value>>;
  std::size_t capacity_;
  std::size_t evictions_ = 0;
  Items items_;  // most recently used first
  std::map<Key, typename Items::iterator> index_;
};

}  // namespace fastllm
