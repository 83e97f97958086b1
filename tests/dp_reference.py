#!/usr/bin/env python3
"""Reference epsilons from Google's dp_accounting, for tests/dp_accounting.rs.

Usage (JSON list of configurations on stdin):

  dp_reference.py --probe
      Exit 0 and print the dp-accounting / numpy / scipy versions if
      dp_accounting is importable.

  dp_reference.py epsilon [--pld]
      stdin:  [{"q": .., "sigma": .., "steps": .., "delta": ..}, ...]
              or, for heterogeneous composition,
              [{"events": [{"q": .., "sigma": .., "steps": ..}, ...], "delta": ..}]
      stdout: line 1: JSON list of epsilons from RdpAccountant (default orders)
              line 2: JSON list of epsilons from PLDAccountant (null without --pld)

  dp_reference.py delta
      stdin:  as for epsilon, with "epsilon" in place of "delta"
      stdout: JSON list of deltas from RdpAccountant.get_delta

  dp_reference.py calibrate
      stdin:  [{"q": .., "steps": .., "delta": .., "target_epsilon": ..}, ...]
      stdout: JSON list of noise multipliers from
              dp_accounting.calibrate_dp_mechanism with RdpAccountant.

Two lines of plain JSON lists instead of one nested document keep the Rust
side free of a JSON dependency.
"""

import json
import sys


def _event(dp_accounting, q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(q), dp_accounting.GaussianDpEvent(float(sigma))
        ),
        int(steps),
    )


def _events(dp_accounting, cfg):
    evs = cfg.get("events") or [cfg]
    return dp_accounting.ComposedDpEvent(
        [_event(dp_accounting, e["q"], e["sigma"], e["steps"]) for e in evs]
    )


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--probe"]:
        from importlib import metadata

        import dp_accounting  # noqa: F401  (the import is the probe)

        print(
            " ".join(
                f"{p}=={metadata.version(p)}"
                for p in ("dp-accounting", "numpy", "scipy")
            )
        )
        return 0

    import dp_accounting
    from dp_accounting import pld, rdp

    mode = args[0] if args else "epsilon"
    configs = json.load(sys.stdin)

    if mode == "epsilon":
        with_pld = "--pld" in args
        rdp_eps, pld_eps = [], []
        for cfg in configs:
            event = _events(dp_accounting, cfg)
            acc = rdp.RdpAccountant()
            acc.compose(event)
            rdp_eps.append(float(acc.get_epsilon(float(cfg["delta"]))))
            if with_pld:
                pacc = pld.PLDAccountant()
                pacc.compose(event)
                pld_eps.append(float(pacc.get_epsilon(float(cfg["delta"]))))
            else:
                pld_eps.append(None)
        print(json.dumps(rdp_eps))
        print(json.dumps(pld_eps))
        return 0

    if mode == "delta":
        deltas = []
        for cfg in configs:
            acc = rdp.RdpAccountant()
            acc.compose(_events(dp_accounting, cfg))
            deltas.append(float(acc.get_delta(float(cfg["epsilon"]))))
        print(json.dumps(deltas))
        return 0

    if mode == "calibrate":
        sigmas = []
        for cfg in configs:
            q, steps = cfg["q"], cfg["steps"]
            sigma = dp_accounting.calibrate_dp_mechanism(
                rdp.RdpAccountant,
                lambda s, q=q, steps=steps: _event(dp_accounting, q, s, steps),
                float(cfg["target_epsilon"]),
                float(cfg["delta"]),
            )
            sigmas.append(float(sigma))
        print(json.dumps(sigmas))
        return 0

    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
