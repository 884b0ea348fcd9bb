"""The interface every serving runtime (``zsad-export --backend``) implements, and the registry of them.

A runtime answers, for one backend: can it run here (``available``: None, or the reason why not), which options it
takes (``check_options``), how it builds its files from a method's stages and the runners the parity gate checks
them with (``build_stages``, then ``after_gate`` for a second form made from gated ONNX), the Triton models it
writes (``model_names``, ``write_chain``, ``triton_config``, ``model_files``), and the zsad-bench backends it times
(``bench_variants``, ``bench_runner``). Export, the repository writer and zsad-bench ask the registry; none of them
names a backend. ``export/runtimes/__init__.py`` imports every module of this folder, so a new backend is one new
file with one ``@register`` class (docs/architecture.md, "Adding a backend").
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from zsad import ZsadError
from zsad.export.triton_repo import ensemble_step, stage_config, write_model

if TYPE_CHECKING:
    from zsad.export.parity import Runner
    from zsad.export.runtimes.runners import BackendRunner, Scratch
    from zsad.export.triton_repo import RepoOptions

RUNTIMES: dict[str, Runtime] = {}  # name -> the runtime, in registration order (the CLI lists them so)


class Runtime:
    """One backend; subclasses set the class attributes and override what differs (see the module docstring)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line in zsad-export --help
    default_device: ClassVar[str] = "gpu"  # instance kind (cpu | gpu) when --device is not given
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # --precision values it takes (--fp16 is apart)
    bench_variants: ClassVar[tuple[str, ...]] = ()  # zsad-bench --backend names this runtime times
    cpu_bench_variants: ClassVar[tuple[str, ...]] = ()  # those of them zsad-bench times on the CPU only
    takes_ov_hint: ClassVar[bool] = False  # its served configs carry OpenVINO's performance hint (--ov-hint)

    def gate_runtime(self) -> str:
        """What runs the exported side of the parity gate, with its version (the parity report says)."""
        raise NotImplementedError

    def available(self) -> str | None:
        """None where this machine can build and check this backend, else the reason why not."""
        return None

    def check_options(self, fp16: bool, device: str, precision: str) -> None:
        """Refuse, with the reason, options this backend cannot build or verify here (before any work)."""
        if precision not in self.precisions:
            takers = " / ".join(rt.name for rt in RUNTIMES.values() if precision in rt.precisions)
            raise ZsadError(f"--precision {precision} is for --backend {takers} (use --fp16 for "
                            f"half precision with {self.name})")
        if fp16:
            self.check_fp16(device)

    def check_fp16(self, device: str) -> None:
        """Refuse --fp16 where it cannot be checked here; by default it can."""

    def build_stages(self, method, stages, opts: RepoOptions, scratch: Path,
                     log) -> tuple[dict[str, Runner], dict[str, Path | list[Path]]]:
        """(parity runners by stage, the files to ship by stage) built from ``stages`` in ``scratch``."""
        raise NotImplementedError

    def after_gate(self, method, stages, stage_files: dict, opts, scratch: Path, feed: dict,
                   log) -> tuple[dict, dict | None, list]:
        """A second form made from the gated files, gated in turn: (files, report section or None, parity rows)."""
        return stage_files, None, []

    def model_names(self, name: str, stages) -> list[str]:
        """The chain's model folders in the repository (one per stage unless a runtime serves the chain whole)."""
        return [f"{name}_{st.name}" for st in stages]

    def write_chain(self, repo: Path, opts: RepoOptions, method, stages, stage_files: dict, precision: str,
                    chain_in: dict, out_tensors: list[dict]) -> tuple[list[str], list[tuple]]:
        """Write the chain's models into ``repo``: (model names, ensemble steps)."""
        models, steps = [], []
        for st in stages:
            mname = f"{opts.name}_{st.name}"
            write_model(repo, self.triton_config(opts, st, mname, precision),
                        files=self.model_files(st, stage_files, opts))
            models.append(mname)
            steps.append(ensemble_step(mname, st.inputs, st.outputs))
        return models, steps

    def triton_config(self, opts: RepoOptions, stage, model_name: str, precision: str = "fp32") -> dict:
        """A stage model's config.pbtxt (as a dict)."""
        return stage_config(opts, stage, model_name, self.runs_on(), self.parameters(opts, stage, precision),
                            self.instance_kind())

    def runs_on(self) -> dict:
        """What runs the stage model: {"platform": ...} or {"backend": ...}."""
        raise NotImplementedError

    def parameters(self, opts: RepoOptions, stage, precision: str) -> dict:
        """The stage model's string parameters (none by default)."""
        return {}

    def instance_kind(self) -> str | None:
        """A fixed instance kind for the stage models, or None for the export's --device."""
        return None

    def model_files(self, stage, stage_files: dict, opts: RepoOptions) -> dict[str, Path | bytes]:
        """A stage model's version-folder files: what ``build_stages`` / ``after_gate`` made, by file name."""
        return {p.name: p for p in stage_files[stage.name]}

    def bench_skip(self, variant: str, device: str) -> str | None:
        """Why zsad-bench cannot time ``variant`` on ``device`` here, known without building anything (so no worker
        process is started for it), or None to try."""
        if variant in self.cpu_bench_variants and device.startswith("cuda"):
            return f"{variant} is a CPU backend: run it with --device cpu"
        return None

    def bench_runner(self, variant: str, method, device: str, max_batch: int, scratch: Scratch) -> BackendRunner:
        """zsad-bench's runner of ``variant`` (one of ``bench_variants``, ``bench_skip`` None); raises runners.Skip
        with the reason where building it fails."""
        raise NotImplementedError


def register(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator: add one instance of ``cls`` to :data:`RUNTIMES` (names and bench variants are unique)."""
    if cls.name in RUNTIMES:
        raise ZsadError(f"internal: two runtimes are named {cls.name}")
    clash = {v for rt in RUNTIMES.values() for v in rt.bench_variants} & set(cls.bench_variants)
    if clash:
        raise ZsadError(f"internal: runtime {cls.name} claims zsad-bench backends {sorted(clash)} of another runtime")
    RUNTIMES[cls.name] = cls()
    return cls
