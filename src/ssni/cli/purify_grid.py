"""Command ``ssni purify-grid``: test images, noised at each level, and purified, as one PNG."""

from __future__ import annotations

import torch

from .demo import DEFAULT_DATA_DIR


def cmd_purify_grid(args) -> int:
    """Test images, their noised versions at each level, and the purified results, as one PNG."""
    from ..core.purifiers import DiffPure, to_image_space, to_model_space
    from ..eval import reports
    from ..eval.streams import seeded_generator
    from . import build
    from .config import RunConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(dataset="fashion-mnist", data_dir=args.data_dir, n=args.n, subset_seed=0)
    if args.score_model_path:
        cfg = cfg.replace(score_model="file", score_model_path=args.score_model_path)
    model = build.build_score_model(cfg)
    x, _ = build.eval_images(cfg)
    purifier = DiffPure(model, reverse_step_size=1e-3)
    rows = [("test image", x)]
    with torch.no_grad():
        for level in args.levels:
            t = torch.full((x.shape[0],), level)
            g_level = seeded_generator(args.seed)
            noised, _ = model.schedule.perturb(to_model_space(x), t, generator=g_level)
            g_level = seeded_generator(args.seed)
            purified = purifier(x, t, generator=g_level)
            rows.append((f"noised t={level:g}", to_image_space(noised)))
            rows.append((f"purified from t={level:g}", purified))
    out = reports.plot_image_grid(
        rows,
        args.out,
        title="DiffPure with the shipped Fashion-MNIST score model (DDPM, 1/1000 steps)",
    )
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "purify-grid",
        help="PNG grid: test images, noised at each level, purified",
        description=cmd_purify_grid.__doc__,
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST idx files")
    p.add_argument("--score-model-path", default="", help="weights file (default: shipped)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--n", type=int, default=8, help="number of test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default="docs/purification_grid.png")
    p.set_defaults(func=cmd_purify_grid)
