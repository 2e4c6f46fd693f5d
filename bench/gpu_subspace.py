"""The subspace method at the size of a large model, on the GPU and on the CPU, in one run.

    python bench/gpu_subspace.py            # 200 concepts x 4 layers, hidden 5120, 400 texts
    python bench/gpu_subspace.py --small    # a minute-sized version that runs anywhere

Synthetic activations stand in for a model: each text is a [tokens, hidden] matrix (100-300
tokens) of Gaussian noise, except that its first six tokens lie (up to a little noise) inside its
concept's own random 3-dimensional subspace. For each device the script feeds every text and
layer to ``TokenSubspaces.add`` (rowspace basis + the shared sum, as ``collect(on_tokens=...)``
would) and then runs ``subspace`` for every concept and layer; it reports the wall time of both
phases, the peak host memory (RSS) and, on CUDA, the peak GPU memory. Each device runs in a
fresh subprocess so its peaks are its own. It also reports how well the planted subspaces were
found (the fraction of each vector inside its concept's subspace) and that both devices agree.

Only torch is needed: the machine that runs it may not have amygdala installed, so the method's
module is loaded from this checkout by path (importing the package would pull in its other
dependencies).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_subspace():
    """amygdala/methods/subspace.py as a module, without importing amygdala.methods."""
    sys.path.insert(0, str(ROOT))  # for its `from amygdala import AmygdalaError` (no dependencies)
    spec = importlib.util.spec_from_file_location("amygdala_subspace", ROOT / "amygdala/methods/subspace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_matrix(args, text: int, layer: int, bases: torch.Tensor) -> torch.Tensor:
    """The synthetic [tokens, hidden] activations of one text at one layer (same on every device)."""
    g = torch.Generator().manual_seed(text * 1000 + layer)
    n = int(torch.randint(args.min_tokens, args.max_tokens + 1, (1,), generator=g))
    x = torch.randn(n, args.hidden, generator=g)
    concept = text % args.concepts
    shared = bases[concept].shape[0]
    x[: 2 * shared] = 3 * torch.randn(2 * shared, shared, generator=g) @ bases[concept] + 0.01 * x[: 2 * shared]
    return x


def concept_bases(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(12345)
    return torch.linalg.qr(torch.randn(args.concepts, args.hidden, 3, generator=g)).Q.transpose(1, 2)


def run_device(args, device: str) -> dict:
    sub = load_subspace()
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bases = concept_bases(args)
    layers = list(range(args.layers))
    store = sub.TokenSubspaces(layers, args.hidden, dev)
    pooled = {l: torch.empty(args.texts, args.hidden) for l in layers}
    make = add = 0.0
    tokens = 0
    for text in range(args.texts):
        for l in layers:
            t0 = time.perf_counter()
            x = text_matrix(args, text, l, bases).to(dev)
            sync()
            t1 = time.perf_counter()
            store.add(text, l, x, start=1)
            sync()
            make += t1 - t0
            add += time.perf_counter() - t1
            pooled[l][text] = x[-1].cpu()
            tokens += len(x) if l == 0 else 0
    # The CPU may solve only the first --cpu-concepts concepts; its solve time is then scaled up.
    solved = args.concepts if dev.type == "cuda" else min(args.cpu_concepts, args.concepts)
    positives = [torch.arange(c, args.texts, args.concepts) for c in range(solved)]
    everyone = torch.arange(args.texts)
    negatives = [everyone[everyone % args.concepts != c] for c in range(solved)]
    t0 = time.perf_counter()
    vectors, eigenvalues = {}, {}
    for l in layers:
        v, extras = sub.subspace(pooled[l], positives, negatives, l, tokens=store, eigen_k=args.eigen_k)
        vectors[l], eigenvalues[l] = v, extras["subspace_eigenvalues"]
    sync()
    solve = time.perf_counter() - t0
    v = torch.stack([vectors[l] for l in layers])  # [layers, concepts, hidden]
    v = v / v.norm(dim=-1, keepdim=True)
    inside = torch.einsum("csh,lch->lcs", bases[:solved], v).norm(dim=-1)  # norm of each vector inside its subspace
    out = {
        "device": device,
        "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "texts": args.texts, "tokens": tokens, "concepts": args.concepts, "layers": args.layers,
        "hidden": args.hidden,
        "make_s": make, "add_s": add, "solve_s": solve * args.concepts / solved, "solved": solved,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "inside_min": float(inside.min()), "inside_mean": float(inside.mean()),
        "top_eigenvalue_mean": float(torch.stack(list(eigenvalues.values()))[..., 0].mean()),
    }
    if dev.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    torch.save(v, args.vectors_out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="20 concepts, hidden 512, 40 texts of 20-60 tokens")
    ap.add_argument("--devices", default=None, help="comma-separated (default: cuda,cpu with a GPU, else cpu)")
    ap.add_argument("--concepts", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--min-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--eigen-k", type=int, default=5)
    ap.add_argument("--cpu-concepts", type=int, default=40,
                    help="concepts the CPU solves (its solve time is scaled to all; default 40)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one device, in a subprocess
    ap.add_argument("--vectors-out", default=None, help=argparse.SUPPRESS)  # where --only saves them
    args = ap.parse_args()
    if args.small:
        args.concepts, args.hidden, args.texts, args.min_tokens, args.max_tokens = 20, 512, 40, 20, 60
    if args.only:
        print(json.dumps(run_device(args, args.only)))
        return

    devices = args.devices.split(",") if args.devices else (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    sizes = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("concepts", "layers", "hidden", "texts", "min_tokens", "max_tokens", "eigen_k", "cpu_concepts")]
    results, vectors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            path = Path(tmp) / f"{device}.pt"
            proc = subprocess.run(
                [sys.executable, __file__, *sizes, "--only", device, "--vectors-out", str(path)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                sys.exit(f"{device}: failed")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            vectors.append(torch.load(path))

    r = results[0]
    print(f"subspace: {r['concepts']} concepts x {r['layers']} layers, hidden {r['hidden']}, "
          f"{r['texts']} texts ({r['tokens']} tokens), eigen_k {args.eigen_k}; torch {torch.__version__}")
    print(f"{'device':<34} {'add s':>7} {'solve s':>8} {'total s':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}  inside(min/mean)")
    for r in results:
        gpu = f"{r['peak_gpu_gib']:.2f}" if "peak_gpu_gib" in r else "-"
        print(f"{r['device'] + ' (' + r['name'] + ')':<34} {r['add_s']:7.1f} {r['solve_s']:8.1f} "
              f"{r['add_s'] + r['solve_s']:8.1f} {r['peak_rss_gib']:13.2f} {gpu:>13}  "
              f"{r['inside_min']:.3f}/{r['inside_mean']:.3f}"
              + (f"  (solve timed on {r['solved']} concepts, scaled)" if r["solved"] < r["concepts"] else ""))
    if len(vectors) > 1:
        both = min(v.shape[1] for v in vectors)
        agree = torch.nn.functional.cosine_similarity(vectors[0][:, :both], vectors[1][:, :both], dim=-1)
        print(f"{devices[0]} vs {devices[1]}: cosine of the same vector min {float(agree.min()):.5f}, "
              f"ratio of total times {devices[1]}/{devices[0]} "
              f"{(results[1]['add_s'] + results[1]['solve_s']) / (results[0]['add_s'] + results[0]['solve_s']):.1f}")
    print("(synthetic-data generation excluded: "
          + ", ".join(f"{r['device']} {r['make_s']:.1f} s" for r in results) + ")")


if __name__ == "__main__":
    main()
