# shellcheck shell=bash
# The checks of the shell tests: each prints "ok   NAME" or "FAIL NAME: why" and counts the
# failures in $failures, which the sourcing test turns into its exit status.
# shellcheck disable=SC2034

failures=0

expect() {
  local name=$1 expected=$2 actual=$3
  if [[ $expected == "$actual" ]]; then
    echo "ok   $name"
  else
    echo "FAIL $name: expected '$expected', got '$actual'"
    failures=$((failures + 1))
  fi
}

expect_true() {
  local name=$1 condition=$2
  if eval "$condition"; then
    echo "ok   $name"
  else
    echo "FAIL $name: $condition is false"
    failures=$((failures + 1))
  fi
}

contains() {
  local name=$1 needle=$2 haystack=$3
  if [[ $haystack == *"$needle"* ]]; then
    echo "ok   $name"
  else
    echo "FAIL $name: '$needle' not in:"
    echo "$haystack"
    failures=$((failures + 1))
  fi
}
