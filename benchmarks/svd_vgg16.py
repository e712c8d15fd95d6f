"""Measure the SVD measure on torchvision VGG-16 (random weights, lin norm, alpha=1).

Not collected by pytest (a script): ``python benchmarks/svd_vgg16.py --size 224`` runs SLQ on
every Conv2d and Linear layer and the exact method on the Linear layers;
``--size 32 --exact-max 4096`` also checks SLQ and the exact methods against each other on the
layers whose Gram side is at most ``--exact-max``. Prints one line per layer and a summary.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn
from torchvision.models import vgg16

from foresight_sparse.connectivity import connectivity
from foresight_sparse.svd import layer_spectrum


def layers(model, size):
    shapes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, i, o, name=name: shapes.__setitem__(
                        name, (mod, tuple(i[0].shape), tuple(o.shape))
                    )
                )
            )
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--exact-max", type=int, default=4096)
    ap.add_argument("--max-probes", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-slq-linear", action="store_true")
    ap.add_argument("--no-dense-check", action="store_true")
    ap.add_argument("--deflate", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = vgg16(weights=None).eval()
    t_all = time.perf_counter()
    print(f"threads={torch.get_num_threads()} size={args.size}", flush=True)
    for name, (m, ins, outs) in layers(model, args.size).items():
        conn = connectivity(m, ins, outs, label=name)
        k = min(conn.n_rows, conn.n_cols)
        exact = None
        if k <= args.exact_max or isinstance(m, nn.Linear):
            t = time.perf_counter()
            exact = layer_spectrum(conn, "lin", method="auto")
            te = time.perf_counter() - t
            print(
                f"{name:12s} {conn.n_rows}x{conn.n_cols} exact[{exact.method}] "
                f"Gamma={exact.gamma_alpha:.10g} r_eps={exact.r_eps} "
                f"dGamma={exact.delta_gamma:.6g} time={te:.1f}s",
                flush=True,
            )
            if exact.method != "dense" and k <= 4096 and not args.no_dense_check:
                t = time.perf_counter()
                d = layer_spectrum(conn, "lin", method="dense", max_memory="6GiB")
                print(
                    f"{'':12s} dense check Gamma={d.gamma_alpha:.10g} "
                    f"rel.diff={abs(d.gamma_alpha - exact.gamma_alpha) / d.gamma_alpha:.2e} "
                    f"time={time.perf_counter() - t:.1f}s",
                    flush=True,
                )
        if isinstance(m, nn.Linear) and args.skip_slq_linear:
            continue
        t = time.perf_counter()
        s = layer_spectrum(
            m, "lin", in_shape=ins, method="slq", tol=args.tol, max_probes=args.max_probes,
            lanczos_steps=args.steps, deflate=args.deflate,
        )  # fmt: skip
        ts = time.perf_counter() - t
        line = (
            f"{name:12s} {conn.n_rows}x{conn.n_cols} slq Gamma={s.gamma_alpha:.8g} "
            f"stderr={s.stderr:.3g} ({s.stderr / s.gamma_alpha:.1e} rel) probes={s.probes} "
            f"r_eps={s.r_eps:.6g} time={ts:.1f}s"
        )
        if exact is not None:
            err = (s.gamma_alpha - exact.gamma_alpha) / exact.gamma_alpha
            line += (
                f" err_vs_exact={err:.2e} ({(s.gamma_alpha - exact.gamma_alpha) / s.stderr:.2f} se)"
            )
        print(line, flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"total {time.perf_counter() - t_all:.1f}s peak RSS {rss:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
