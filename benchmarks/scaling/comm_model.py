#!/usr/bin/env python3
"""Communication volume per rank and optimizer step of a fastllm layout (tensor x pipeline x data
parallel, ZeRO-1 on or off), and the share of the step's compute time each collective would take
at stated link speeds. Assumptions are printed with every table; see benchmarks/scaling/README.md.

  comm_model.py                                   projections for Mistral-7B and Mixtral-8x7B
  comm_model.py --model mistral-7b --gpus 64 --tp 4 --pp 2 --zero 1     one layout in detail
  comm_model.py --model custom --layers 2 --hidden 16 ... --json        any architecture, as JSON

Standard library only.
"""
import argparse
import dataclasses
import json
import sys


@dataclasses.dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # per expert for MoE
    vocab: int
    experts: int = 1
    top_k: int = 1
    window: int = 0  # 0: full causal attention
    tied: bool = False

    @property
    def moe(self):
        return self.experts > 1


# Hugging Face config.json of mistralai/Mistral-7B-v0.1 and mistralai/Mixtral-8x7B-v0.1.
MODELS = {
    "mistral-7b": Architecture(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                               ffn=14336, vocab=32000, window=4096),
    "mixtral-8x7b": Architecture(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                                 ffn=14336, vocab=32000, experts=8, top_k=2),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0

    @property
    def world(self):
        return self.tp * self.pp * self.dp

    def rank(self, tp, dp, pp):
        # docs/DESIGN.md section 5: tensor fastest, then data, then pipeline.
        return tp + self.tp * (dp + self.dp * pp)


@dataclasses.dataclass(frozen=True)
class Run:
    sequence: int = 4096
    micro_batch: int = 1
    global_batch: int = 1024  # samples
    activation_bytes: int = 2  # bf16 activations and their gradients
    gradient_bytes: int = 4  # fp32 gradients, reduced in fp32
    weight_bytes: int = 2  # bf16 weights, all-gathered after the sharded update (ZeRO-1)
    optimizer_bytes: int = 12  # fp32 master weights + two AdamW moments
    recompute: bool = False  # activation recomputation repeats the forward all-reduces


@dataclasses.dataclass(frozen=True)
class Machine:
    gpus_per_node: int = 8
    nvlink: float = 450e9  # bytes/s per direction per GPU (NVLink 4, H100 SXM)
    network: float = 50e9  # bytes/s per GPU across nodes (one InfiniBand NDR 400 Gb/s NIC each)
    peak_flops: float = 989e12  # dense bf16, H100/H200 SXM
    mfu: float = 0.40


def stage_layers(layers, stages, stage):
    """Contiguous blocks, the first stages taking one more layer when the count does not divide."""
    base, extra = divmod(layers, stages)
    begin = stage * base + min(stage, extra)
    return begin, begin + base + (1 if stage < extra else 0)


def validate(a, lay, run):
    problems = []
    if a.heads % lay.tp:
        problems.append(f"tp {lay.tp} does not divide {a.heads} heads")
    if a.kv_heads % lay.tp and lay.tp % a.kv_heads:
        problems.append(f"tp {lay.tp} and {a.kv_heads} KV heads: neither divides the other")
    if a.ffn % lay.tp:
        problems.append(f"tp {lay.tp} does not divide ffn {a.ffn}")
    if lay.pp > a.layers:
        problems.append(f"pp {lay.pp} exceeds {a.layers} layers")
    if run.global_batch % (lay.dp * run.micro_batch):
        problems.append(f"global batch {run.global_batch} is not a multiple of dp {lay.dp} x "
                        f"micro-batch {run.micro_batch}")
    if problems:
        raise ValueError("; ".join(problems))


def rank_parameters(a, lay, stage):
    """Parameters one rank of pipeline stage `stage` holds: its tensor-parallel slice."""
    t, h = lay.tp, a.hidden
    q = a.heads * a.head_dim // t
    # KV heads are split when there are enough of them, else each rank keeps one group.
    kv = a.kv_heads * a.head_dim // t if a.kv_heads % t == 0 else a.head_dim
    attention = h * q + 2 * h * kv + q * h
    expert = 3 * h * (a.ffn // t)
    mlp = a.experts * (expert + h) if a.moe else expert  # the router (h per expert) replicated
    begin, end = stage_layers(a.layers, lay.pp, stage)
    total = (end - begin) * (attention + mlp + 2 * h)
    vocab_rows = -(-a.vocab // t) * h  # vocabulary padded to a multiple of tp
    first, last = stage == 0, stage == lay.pp - 1
    if first:
        total += vocab_rows
    if last:
        total += h
        if not (a.tied and first):
            total += vocab_rows
    return total


def total_parameters(a):
    return rank_parameters(a, Layout(), 0)


def flops_per_token(a, sequence):
    """docs/DESIGN.md section 7: 6 x matmul weights used per token (LM head included, embedding not)
    + 6 x layers x heads x head_dim x attended context."""
    h = a.hidden
    attention = 2 * h * a.heads * a.head_dim + 2 * h * a.kv_heads * a.head_dim
    mlp = 3 * h * a.ffn * (a.top_k if a.moe else 1) + (h * a.experts if a.moe else 0)
    matmul = a.layers * (attention + mlp) + a.vocab * h
    w = a.window
    context = w - w * w / (2 * sequence) if 0 < w < sequence else sequence / 2
    return 6 * matmul + 6 * a.layers * a.heads * a.head_dim * context


def ring_all_reduce(n):
    """Share of the buffer each rank sends in a ring all-reduce of n ranks."""
    return 2 * (n - 1) / n


def ring_half(n):
    """Share of the full buffer each rank sends in a ring reduce-scatter or all-gather."""
    return (n - 1) / n


def group_bandwidth(ranks, machine):
    """Bytes/s one rank of a collective over `ranks` gets: NVLink inside one node; across nodes the
    group's members on a node share their NICs (NCCL spreads its rings over them), so the slowest
    node gives min(NVLink, members on that node x network)."""
    per_node = {}
    for r in ranks:
        node = r // machine.gpus_per_node
        per_node[node] = per_node.get(node, 0) + 1
    if len(per_node) == 1:
        return machine.nvlink, "NVLink"
    k = min(per_node.values())
    return min(machine.nvlink, k * machine.network), f"IB x{k}" if k > 1 else "IB"


def model_layout(a, lay, run, machine):
    """Every collective of one step for the busiest rank of each pipeline stage."""
    validate(a, lay, run)
    t, p, d = lay.tp, lay.pp, lay.dp
    micro_batches = run.global_batch // (d * run.micro_batch)
    tokens = run.micro_batch * run.sequence
    activation = tokens * a.hidden * run.activation_bytes  # one [b, s, h] tensor
    step_flops = flops_per_token(a, run.sequence) * run.global_batch * run.sequence
    compute_seconds = step_flops / (lay.world * machine.peak_flops * machine.mfu)

    stages = []
    for stage in range(p):
        begin, end = stage_layers(a.layers, p, stage)
        layers = end - begin
        first, last = stage == 0, stage == p - 1
        params = rank_parameters(a, lay, stage)
        items = []

        def add(kind, name, group, bytes_sent, bandwidth_link):
            bandwidth, link = bandwidth_link
            seconds = bytes_sent / bandwidth if bytes_sent else 0.0
            items.append({"kind": kind, "collective": name, "group": group, "link": link,
                          "bytes": bytes_sent, "seconds": seconds,
                          "fraction": seconds / compute_seconds})

        if t > 1:
            tp_link = group_bandwidth([lay.rank(i, 0, stage) for i in range(t)], machine)
            per_layer = 4 + (2 if run.recompute else 0)
            add("TP", f"all-reduce [b,s,h] x {per_layer} per layer (attention and MLP outputs "
                "forward, their input gradients backward)", t,
                micro_batches * layers * per_layer * ring_all_reduce(t) * activation, tp_link)
            edge = (1 if first else 0) + (1 if last else 0)
            small = (3 * tokens * 4 if last else 0) + (
                layers * tokens * a.top_k * 4 if a.moe else 0)
            if edge or small:
                add("TP", "vocab-parallel embedding/LM head all-reduce [b,s,h], cross-entropy "
                    "max/sum/target [b,s] fp32" + (", router gradient [b,s,k] fp32" if a.moe
                                                  else ""),
                    t, micro_batches * ring_all_reduce(t) * (edge * activation + small), tp_link)
        if p > 1:
            sends = (0 if last else 1) + (0 if first else 1)
            neighbours = []
            if not last:
                neighbours.append(stage + 1)
            if not first:
                neighbours.append(stage - 1)
            links = [group_bandwidth([lay.rank(i, j, stage), lay.rank(i, j, other)], machine)
                     for other in neighbours for i in range(t) for j in range(d)]
            slowest = min(links, key=lambda bl: bl[0])
            # A point-to-point send uses one NIC, not the group's.
            if slowest[1].startswith("IB"):
                slowest = (machine.network, "IB")
            add("PP", "send activations forward / gradients backward [b,s,h] per micro-batch",
                2, micro_batches * sends * activation, slowest)
        if d > 1:
            dp_link = group_bandwidth([lay.rank(0, j, stage) for j in range(d)], machine)
            if lay.zero:
                add("DP", "reduce-scatter fp32 gradients", d,
                    ring_half(d) * run.gradient_bytes * params, dp_link)
                add("DP", "all-gather bf16 weights after the sharded AdamW step", d,
                    ring_half(d) * run.weight_bytes * params, dp_link)
            else:
                add("DP", "all-reduce fp32 gradients", d,
                    ring_all_reduce(d) * run.gradient_bytes * params, dp_link)
        optimizer_shards = d if lay.zero else 1
        memory = params * (run.weight_bytes + run.gradient_bytes
                           + run.optimizer_bytes / optimizer_shards)
        stages.append({"stage": stage, "layers": [begin, end], "parameters": params,
                       "static_memory_bytes": memory, "collectives": items,
                       "comm_seconds": sum(i["seconds"] for i in items)})

    busiest = max(stages, key=lambda s: s["comm_seconds"])
    by_kind = {}
    for kind in ("TP", "PP", "DP"):
        chosen = [i for i in busiest["collectives"] if i["kind"] == kind]
        by_kind[kind] = {"bytes": sum(i["bytes"] for i in chosen),
                         "seconds": sum(i["seconds"] for i in chosen)}
        by_kind[kind]["fraction"] = by_kind[kind]["seconds"] / compute_seconds
    return {
        "layout": dataclasses.asdict(lay), "world": lay.world, "run": dataclasses.asdict(run),
        "machine": dataclasses.asdict(machine), "architecture": dataclasses.asdict(a),
        "total_parameters": total_parameters(a),
        "flops_per_token": flops_per_token(a, run.sequence),
        "micro_batches_per_rank": micro_batches, "compute_seconds": compute_seconds,
        "pipeline_bubble": (p - 1) / (micro_batches + p - 1),
        "stages": stages, "busiest_stage": busiest["stage"], "by_kind": by_kind,
        "comm_fraction": busiest["comm_seconds"] / compute_seconds,
        "max_static_memory_bytes": max(s["static_memory_bytes"] for s in stages),
    }


def assumptions(run, machine):
    return [
        f"sequence {run.sequence}, micro-batch {run.micro_batch}, global batch {run.global_batch} "
        f"samples ({run.global_batch * run.sequence / 1e6:.2f} M tokens) per step; 1F1B pipeline; "
        f"activation recomputation {'on' if run.recompute else 'off'}; no sequence parallelism",
        f"step compute time = model FLOPs (docs/DESIGN.md section 7) / (GPUs x "
        f"{machine.peak_flops / 1e12:.0f} TFLOP/s x MFU {machine.mfu:.0%}); a collective's share "
        "is its time over that, as if nothing overlapped",
        "bytes = what one rank sends per step (it receives as much); ring all-reduce 2(n-1)/n of "
        "the buffer, reduce-scatter and all-gather (n-1)/n each",
        "activations bf16; gradients reduced in fp32; ZeRO-1 = reduce-scatter fp32 gradients + "
        "all-gather bf16 weights; MoE experts split over TP (no expert parallelism)",
        f"{machine.gpus_per_node} GPUs per node; NVLink {machine.nvlink / 1e9:.0f} GB/s per "
        f"direction per GPU inside a node; across nodes {machine.network / 1e9:.0f} GB/s per GPU "
        "(one 400 Gb/s NIC each), a collective getting min(NVLink, k x that) with k its members "
        "on a node; pipeline sends over one NIC",
        "static memory = bf16 weights + fp32 gradients + fp32 master and AdamW moments (sharded "
        "over DP with ZeRO-1), as `fastllm inspect` counts it; activations not included",
    ]


def gb(x):
    return f"{x / 1e9:.2f}"


def pct(x):
    return f"{100 * x:.1f}%"


def layout_name(lay):
    parts = [f"TP{lay.tp}" if lay.tp > 1 else "", f"PP{lay.pp}" if lay.pp > 1 else "",
             f"DP{lay.dp}" if lay.dp > 1 else ""]
    return " x ".join(p for p in parts if p) or "1 GPU"


def print_detail(name, r, out):
    lay = Layout(**r["layout"])
    out.write(f"{name}, {r['world']} GPUs, {layout_name(lay)}, ZeRO-{lay.zero}: "
              f"{r['total_parameters'] / 1e9:.2f} B parameters, "
              f"{r['flops_per_token'] / 1e9:.1f} GFLOP/token, step compute "
              f"{r['compute_seconds']:.2f} s, {r['micro_batches_per_rank']} micro-batches per "
              f"rank, pipeline bubble {pct(r['pipeline_bubble'])}\n")
    for s in r["stages"]:
        out.write(f"  stage {s['stage']} (layers {s['layers'][0]}-{s['layers'][1] - 1}): "
                  f"{s['parameters'] / 1e6:.1f} M parameters per rank, static memory "
                  f"{s['static_memory_bytes'] / 2**30:.1f} GiB\n")
        for i in s["collectives"]:
            out.write(f"    {i['kind']:2} {gb(i['bytes']):>9} GB {1e3 * i['seconds']:9.1f} ms "
                      f"{pct(i['fraction']):>7}  over {i['group']} ({i['link']}): "
                      f"{i['collective']}\n")
        if not s["collectives"]:
            out.write("    no communication\n")
    out.write(f"  busiest stage {r['busiest_stage']}: communication "
              f"{pct(r['comm_fraction'])} of the step compute time\n")


PROJECTIONS = [
    ("mistral-7b", Layout(tp=1, pp=1, dp=64, zero=1)),
    ("mistral-7b", Layout(tp=8, pp=1, dp=8, zero=0)),
    ("mistral-7b", Layout(tp=8, pp=1, dp=8, zero=1)),
    ("mistral-7b", Layout(tp=4, pp=2, dp=8, zero=1)),
    ("mistral-7b", Layout(tp=2, pp=1, dp=32, zero=1)),
    ("mistral-7b", Layout(tp=1, pp=1, dp=512, zero=1)),
    ("mistral-7b", Layout(tp=8, pp=1, dp=64, zero=1)),
    ("mistral-7b", Layout(tp=4, pp=2, dp=64, zero=1)),
    ("mixtral-8x7b", Layout(tp=8, pp=1, dp=8, zero=1)),
    ("mixtral-8x7b", Layout(tp=8, pp=2, dp=4, zero=1)),
    ("mixtral-8x7b", Layout(tp=4, pp=4, dp=4, zero=1)),
    ("mixtral-8x7b", Layout(tp=8, pp=1, dp=64, zero=1)),
    ("mixtral-8x7b", Layout(tp=8, pp=4, dp=16, zero=1)),
    ("mixtral-8x7b", Layout(tp=4, pp=4, dp=32, zero=1)),
]


def print_projections(run, machine, out):
    out.write("| model | GPUs | layout | ZeRO | params/rank | static mem/rank | step compute | "
              "TP GB/rank (share) | PP GB/rank (share) | DP GB/rank (share) | PP bubble | "
              "comm share |\n")
    out.write("|---|---:|---|:-:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for name, lay in PROJECTIONS:
        r = model_layout(MODELS[name], lay, run, machine)
        busiest = r["stages"][r["busiest_stage"]]

        def cell(kind):
            k = r["by_kind"][kind]
            return f"{gb(k['bytes'])} ({pct(k['fraction'])})" if k["bytes"] else "-"

        out.write(f"| {name} | {r['world']} | {layout_name(lay)} | {lay.zero} | "
                  f"{busiest['parameters'] / 1e9:.2f} B | "
                  f"{r['max_static_memory_bytes'] / 2**30:.1f} GiB | "
                  f"{r['compute_seconds']:.2f} s | {cell('TP')} | {cell('PP')} | {cell('DP')} | "
                  f"{pct(r['pipeline_bubble']) if lay.pp > 1 else '-'} | "
                  f"{pct(r['comm_fraction'])} |\n")
    out.write("\nAssumptions:\n")
    for line in assumptions(run, machine):
        out.write(f"- {line}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", choices=sorted(MODELS) + ["custom"],
                        help="architecture; without it, print the projection table")
    for flag in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "experts",
                 "top_k", "window"):
        parser.add_argument(f"--{flag}", type=int, help="override the model's value")
    parser.add_argument("--tied", type=int, choices=[0, 1])
    parser.add_argument("--gpus", type=int, help="world size; dp = gpus / (tp x pp)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--zero", type=int, choices=[0, 1], default=1)
    parser.add_argument("--sequence", type=int, default=Run.sequence)
    parser.add_argument("--micro_batch", type=int, default=Run.micro_batch)
    parser.add_argument("--global_batch", type=int, default=Run.global_batch)
    parser.add_argument("--recompute", type=int, choices=[0, 1], default=0)
    parser.add_argument("--gpus_per_node", type=int, default=Machine.gpus_per_node)
    parser.add_argument("--nvlink_gbps", type=float, default=Machine.nvlink / 1e9,
                        help="GB/s per direction per GPU inside a node")
    parser.add_argument("--network_gbps", type=float, default=Machine.network / 1e9,
                        help="GB/s per GPU across nodes")
    parser.add_argument("--peak_tflops", type=float, default=Machine.peak_flops / 1e12)
    parser.add_argument("--mfu", type=float, default=Machine.mfu)
    parser.add_argument("--json", action="store_true", help="one layout's result as JSON")
    args = parser.parse_args(argv)

    run = Run(sequence=args.sequence, micro_batch=args.micro_batch,
              global_batch=args.global_batch, recompute=bool(args.recompute))
    machine = Machine(gpus_per_node=args.gpus_per_node, nvlink=args.nvlink_gbps * 1e9,
                      network=args.network_gbps * 1e9, peak_flops=args.peak_tflops * 1e12,
                      mfu=args.mfu)
    if args.model is None:
        print_projections(run, machine, sys.stdout)
        return 0

    base = MODELS.get(args.model)
    fields = {f.name: getattr(base, f.name) if base else None
              for f in dataclasses.fields(Architecture)}
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = bool(value) if name == "tied" else value
    defaults = {"experts": 1, "top_k": 1, "window": 0, "tied": False}
    for name, value in defaults.items():
        if fields[name] is None:
            fields[name] = value
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        parser.error("--model custom needs " + ", ".join("--" + m for m in missing))
    arch = Architecture(**fields)
    if args.gpus is None or args.gpus % (args.tp * args.pp):
        parser.error("--gpus must be a multiple of --tp x --pp")
    lay = Layout(tp=args.tp, pp=args.pp, dp=args.gpus // (args.tp * args.pp), zero=args.zero)
    try:
        result = model_layout(arch, lay, run, machine)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_detail(args.model, result, sys.stdout)
        sys.stdout.write("Assumptions:\n")
        for line in assumptions(run, machine):
            sys.stdout.write(f"- {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
