"""The rows of a study run: the methods, ablations and swept values asked for, each seed of
each, which Stage I init and router start each trains from, and so which students to build."""

from __future__ import annotations

import dataclasses

from padd.config import ConfigError, ReproduceConfig, TrainConfig
from padd.methods import ABLATIONS, METHODS, OFF_AT_ZERO, TABLE_ROWS, options_of
from padd.study.preset import (
    INITS,
    PRETRAINED_INITS,
    PRETRAINED_LABELS,
    ROUTER_STARTS,
    Study,
    parse_sweep,
    sweep_row,
)


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    if value == "all":
        return list(allowed)
    if value in ("", "none"):
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    if bad := [v for v in items if v not in allowed]:
        raise ConfigError(f"--{flag}: unknown {bad}; choose from {', '.join(allowed)} (or all / none)")
    return items


class StudyGrid:
    """The rows (methods, ablations, swept values) × seeds of a run of `study`, as `cfg` asks.

    grid.rows()          # (row, Stage I init, router start, padd-train overrides, seed) of each
    grid.warm_starts()   # the warmed-up students those rows start from
    """

    def __init__(self, cfg: ReproduceConfig, study: Study):
        self.study, self.compare_inits = study, cfg.compare_inits
        self.methods = _split(cfg.methods, TABLE_ROWS, "methods")
        self.ablations = _split(cfg.ablations, tuple(ABLATIONS), "ablations")
        self.sweep = parse_sweep(cfg.sweep, study)
        self.seeds = list(range(cfg.seeds))
        self.pretrained = study.student is not None
        self.inits = PRETRAINED_INITS if self.pretrained else INITS
        # every row's router start
        self.start = study.warmup.get("router_init", "keep" if self.pretrained else "uniform")
        if self.pretrained and cfg.ablations == "all":  # every ablation that applies to a pretrained student
            self.ablations.remove("other-start")
        elif self.pretrained and "other-start" in self.ablations:
            raise ConfigError(
                "--ablations other-start compares router starts of a decomposed student; a pretrained student keeps "
                "its seeded router (leave other-start out)"
            )

    def manifest(self) -> dict:
        """The manifest's record of the rows this invocation runs."""
        return dict(
            methods=self.methods,
            ablations=self.ablations,
            seeds=self.seeds,
            router_start=self.start,
            inits=self.inits,
            row_labels=PRETRAINED_LABELS if self.pretrained else {},
            sweep=None
            if self.sweep is None
            else {
                "method": self.sweep[0],
                "option": self.sweep[1],
                "values": self.sweep[2],
                "base": self.setting(self.sweep[0], self.sweep[1]),
            },
            sweep_rows=self.sweep_rows(),
        )

    def method_settings(self, method: str, switches: dict | None = None) -> dict:
        """padd train overrides of one method's row: the preset's options for that method, without
        those its ablation switches turn off."""
        used = options_of(method, switches)
        return {k: v for k, v in (self.study.methods.get(method) or {}).items() if k in used}

    def setting(self, method: str, option: str):
        """The value `method`'s own row trains with: the preset's, else padd.methods', else padd train's."""
        for source in (self.study.methods.get(method) or {}, self.study.train, METHODS[method].options):
            if option in source:
                return source[option]
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == option)

    def sweep_rows(self) -> list[str]:
        if self.sweep is None:
            return []
        method, option, values = self.sweep
        return [sweep_row(method, option, v) for v in values]

    def rows(self) -> list[tuple[str, str, str, dict, int | None]]:
        """(row, Stage I init, router start, padd-train overrides, seed) of every trained or evaluated student."""
        with_stage1 = self.inits["cluster"]
        out = [("base", with_stage1, self.start, {}, None)] if "base" in self.methods else []
        for seed in self.seeds:
            for m in self.methods:
                if m != "base":
                    out.append((m, with_stage1, self.start, {"method": m, **self.method_settings(m)}, seed))
            for a in self.ablations:
                v = ABLATIONS[a]
                kw = {"method": "padd", **v.switches, **self.method_settings("padd", v.switches), **v.shared}
                out.append((a, self.inits[v.init], self.other_start if v.start == "other" else self.start, kw, seed))
            if self.sweep is not None:
                method, option, values = self.sweep
                for value, row in zip(values, self.sweep_rows(), strict=True):
                    # at 0 the option turns its stage off: the preset's options of that stage go with it
                    off = OFF_AT_ZERO.get(option, ()) if value == 0 else ()
                    kept = {k: v for k, v in self.method_settings(method).items() if k not in off}
                    kw = {"method": method, **kept, option: value}
                    out.append((row, with_stage1, self.start, kw, seed))
        return out

    @property
    def other_start(self) -> str:
        """The router start the preset does not use (built beside it for NMI / ESI and other-start)."""
        return next(s for s in ROUTER_STARTS if s != self.start)

    def warm_starts(self) -> dict[str, list[str]]:
        """The warmed-up students to build: init -> router starts. Both inits at both starts for the
        report's NMI / ESI comparison (--compare-inits), else only those the rows train from."""
        if self.pretrained:  # one start (the seeded router, kept); both inits to compare them
            inits = {init for _, init, _, _, _ in self.rows()} | {self.inits["cluster"]}
            if self.compare_inits:
                inits |= set(self.inits.values())
            return {init: [self.start] for init in self.inits.values() if init in inits}
        if self.compare_inits:
            return {init: [self.start, self.other_start] for init in ("cluster", "random")}
        needed: dict[str, list[str]] = {"cluster": [self.start]}
        for _, init, start, _, _ in self.rows():
            needed.setdefault(init, [self.start])
            if start not in needed[init]:
                needed[init].append(start)
        return needed
