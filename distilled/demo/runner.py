"""``distill demo``: the whole distillation pipeline, offline, on CPU, at toy scale.

Why a separate orchestrator: every stage here is the *real* command a cluster run uses
(``distill generate`` against a teacher server, ``distill reject``, MindFormers'
``datasets_preprocess.py`` with this project's handlers, ``msrun`` through
``scripts/msrun_launcher.sh``, ``distill parity``, ``distill eval``), run as a subprocess with
its own progress bar. The demo only wires them together, times them, skips finished stages on a
rerun, and writes ``report.md`` from the stages' own JSON outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from distilled import SYSTEM_PROMPT
from distilled.paths import REPO_ROOT as REPO
from distilled.settings import add_arguments, from_args, option

if TYPE_CHECKING:  # pragma: no cover
    from distilled.train.tiny_model import TinyQwen2Shape

PROMPT_TEMPLATE = "{prompt}"
"""The teacher is asked the bare problem, and the student is evaluated on the same prompt format
(with the MindSpore docs' system prompt, which the handlers add in training): a model must be
evaluated on the format it was trained with. Long instructions would also triple the tokens the
toy student has to train on."""


class StageFailed(RuntimeError):
    """A stage's command failed; the message names the stage and the command."""


@dataclass
class DemoConfig:
    """Sizes and paths of the demo. Defaults fit the 15-minute budget on 2 CPU cores.

    Why these sizes (measured with ``distill train --backend torch`` on the same packed data and
    derived YAML, then with MindFormers in graph mode; docs/benchmarks.md has the table): the
    students that fit the budget learn the answer *format* quickly and the arithmetic barely at all,
    because they rarely learn to copy the numbers from the problem. Fine-tuning time, not data, is
    the limit, and trained tokens matter more than depth: a 2-layer hidden-128 student over 2 epochs
    beat a 4-layer one over 1 epoch in the same wall time (digit loss 1.57 vs 1.96 nats). The
    budget holds ~2 epochs of ~4,000 distinct problems (one generation each: distinct problems
    teach more than a second wording of the same one)."""

    output: Path = option(Path("runs/demo"), help="output directory (default: %(default)s)")
    n_train: int = option(4000, help="synthetic training problems")
    n_test: int = option(100, help="held-out synthetic test problems")
    num_generations: int = option(1, help="teacher generations per problem")
    wrong_rate: float = 0.2  # no flag: the stand-in teacher's share of wrong answers
    seq_length: int = option(1024, help="packed row length")
    vocab_size: int = option(2048, help="student vocabulary: the Qwen2.5 BPE trimmed to this many ids (151665 = all)")
    hidden_size: int = option(128, help="student hidden size (MLP: 4x)")
    num_layers: int = option(2, help="student decoder layers")
    num_heads: int = option(4, help="student attention heads")
    n_kv_heads: int = option(2, help="student key/value heads (GQA)")
    rope_theta: float = option(10000.0, help="student RoPE base")
    epochs: int = option(2, help="fine-tuning epochs")
    learning_rate: float = option(
        5e-3, help="peak learning rate of the tiny student (the YAML's linear warm-up/decay schedule)")
    workers: int = option(2, help="msrun workers / verifier processes")
    parity_steps: int = option(3, help="training steps the MindSpore-vs-torch parity stage compares")
    eval_max_tokens: int = option(256, help="max new tokens per answer in the before/after eval")
    seed: int = option(0, help="seed of every stage (same seed, same run)")
    # logits distillation (docs/logits-distillation.md): capture the stand-in teacher's top-K,
    # preprocess with aligned top-K columns, fine-tune KDLlamaForCausalLM (configs/*_kd.yaml)
    kd: bool = option(False, help="logits distillation: capture the teacher's top-K log-probabilities and "
                                  "fine-tune on alpha * CE + (1 - alpha) * KL (docs/logits-distillation.md)")
    kd_top_k: int = option(8, help="with --kd: K (<= 20)")
    kd_alpha: float = option(0.5, help="with --kd: weight of CE (1 = plain SFT)")
    force: bool = option(False, help="start over: delete the output directory and redo every stage")

    @property
    def python(self) -> str:
        return sys.executable

    def shape(self) -> "TinyQwen2Shape":
        """The student's shape: the single source for the HF student and the derived YAML."""
        from distilled.train.tiny_model import TinyQwen2Shape

        return TinyQwen2Shape(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                              intermediate_size=4 * self.hidden_size, num_hidden_layers=self.num_layers,
                              num_attention_heads=self.num_heads, num_key_value_heads=self.n_kv_heads,
                              rope_theta=self.rope_theta)


@dataclass
class StageResult:
    """One row of the stage table: what went in, what came out, how long it took."""

    name: str
    rows_in: int | None = None
    rows_out: int | None = None
    seconds: float = 0.0
    throughput: str = ""
    summary: str = ""
    extra: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Demo:
    """Runs the stages in order; each stage returns a ``StageResult`` saved under ``stages/``."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = cfg.output.resolve()
        self.results: list[StageResult] = []
        self.env = dict(os.environ)
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("HF_DATASETS_OFFLINE", "1")
        self.env.setdefault("GLOG_v", "3")
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")

    # -- paths ---------------------------------------------------------------
    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    # -- running commands ----------------------------------------------------
    def run(self, stage: str, cmd: list[str], cwd: Path | None = None) -> None:
        """Run one real command; its progress bar goes to the terminal, a copy of its output to
        ``logs/<stage>.log``. A non-zero exit raises ``StageFailed`` naming the stage."""
        log = self.p("logs", f"{stage}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"  $ {shlex.join(cmd)}", flush=True)
        with open(log, "ab") as lf:
            lf.write(f"$ {shlex.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                lf.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            rc = proc.wait()
        if rc != 0:
            raise StageFailed(f"stage '{stage}' failed: `{shlex.join(cmd)}` exited {rc} (log: {log})")

    def distill(self, stage: str, *args: str) -> None:
        self.run(stage, [self.cfg.python, "-m", "distilled", *args])

    @contextlib.contextmanager
    def teacher(self) -> Iterator[str]:
        """Start the stand-in teacher on 127.0.0.1 in the background; always stop it
        (:func:`~distilled.generate.teacher_server.spawn_teacher`)."""
        from distilled.generate.teacher_server import TeacherStartError, spawn_teacher

        flags = ["--wrong-rate", str(self.cfg.wrong_rate), "--latency-ms", "20", "--capacity", "32",
                 "--seed", str(self.cfg.seed)]
        if self.cfg.kd:
            flags += ["--tokenizer", str(self.p("tokenizer"))]
        try:
            with spawn_teacher(flags, log=self.p("logs", "serve-teacher.log"), python=self.cfg.python,
                               env=self.env, cwd=REPO, timeout=60,
                               echo=lambda line: print(f"  $ {line} &", flush=True)) as t:
                yield t.addr
        except TeacherStartError as exc:
            raise StageFailed(f"stage 'generate': {exc}") from None

    # -- stage bookkeeping ---------------------------------------------------
    def stage(self, name: str, fn: Callable[[], StageResult]) -> StageResult:
        marker = self.p("stages", f"{name}.json")
        if marker.exists() and not self.cfg.force:
            res = StageResult(**_read_json(marker))
            print(f"[{name}] done already ({res.summary}); skipping (use --force to redo)", flush=True)
            self.results.append(res)
            return res
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        res = fn()
        res.seconds = round(time.perf_counter() - t0, 2)
        from distilled.io_utils import write_json

        write_json(marker, asdict(res))
        print(f"[{name}] {res.summary} ({res.seconds:.1f}s)", flush=True)
        self.results.append(res)
        return res

    def prepare(self) -> None:
        """``--force`` starts from an empty output directory (resumable stages such as generate
        would otherwise pick up their old outputs). Without it, refuse to mix settings: a rerun
        with other sizes into the same directory would skip stages built for the old sizes."""
        import shutil

        from distilled.io_utils import write_json

        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()
                    if k not in ("force", "output")}
        marker = self.p("demo_settings.json")
        if self.cfg.force and self.out.exists():
            if self.out == REPO or REPO.is_relative_to(self.out):
                raise StageFailed(f"refusing to delete {self.out}: it holds the repository")
            shutil.rmtree(self.out)
        elif marker.exists():
            old = _read_json(marker)
            if old != settings:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
                raise StageFailed(f"{self.out} was made with other settings ({diff}); rerun with --force "
                                  f"to start over, or pick another --output")
        write_json(marker, settings)

    def run_all(self) -> None:
        self.prepare()
        self.stage("problems", self.s_problems)
        if self.cfg.kd:  # the teacher's top-K is mapped to (and checked against) the student's tokenizer
            self.stage("tokenizer", self.s_tokenizer)
        self.stage("generate", self.s_generate)
        self.stage("reject", self.s_reject)
        if not self.cfg.kd:
            self.stage("tokenizer", self.s_tokenizer)
        self.stage("preprocess", self.s_preprocess)
        self.stage("student", self.s_student)
        self.stage("eval-before", lambda: self.s_eval("eval-before", self.p("student-init"), "student (before)"))
        self.stage("finetune", self.s_finetune)
        self.stage("parity", self.s_parity)
        self.stage("eval-after", lambda: self.s_eval("eval-after", self.p("student-final"), "student (after)"))
        self.write_report()

    # -- the stages ----------------------------------------------------------
    def s_problems(self) -> StageResult:
        c = self.cfg
        self.distill("problems", "problems", "synth", "--n", str(c.n_train), "--seed", str(c.seed),
                     "--output", str(self.p("data", "train.jsonl")),
                     "--test-n", str(c.n_test), "--test-output", str(self.p("data", "test.jsonl")))
        n_tr, n_te = _count_lines(self.p("data", "train.jsonl")), _count_lines(self.p("data", "test.jsonl"))
        return StageResult("problems", rows_in=None, rows_out=n_tr,
                           summary=f"{n_tr} train problems, {n_te} held-out test problems",
                           extra={"train": n_tr, "test": n_te})

    def s_generate(self) -> StageResult:
        c = self.cfg
        out = self.p("data", "generations.jsonl")
        t0 = time.perf_counter()
        with self.teacher() as addr:
            self.distill("generate", "generate", "--model", "stand-in-teacher",
                         "--dataset-name", str(self.p("data", "train.jsonl")),
                         "--output-file", str(out), "--prompt-column", "problem", "--uuid-column", "id",
                         "--api-addr", addr, "--num-generations", str(c.num_generations),
                         "--max-tokens", "2048", "--max-concurrent", "32", "--seed", str(c.seed),
                         "--prompt-template", PROMPT_TEMPLATE,
                         *(["--top-logprobs", str(c.kd_top_k), "--tokenizer", str(self.p("tokenizer"))] if c.kd else []))
        dt = time.perf_counter() - t0
        rows = _count_lines(out)
        gens = rows * c.num_generations
        return StageResult("generate", rows_in=_count_lines(self.p("data", "train.jsonl")), rows_out=rows,
                           throughput=f"{gens / dt:.1f} gen/s",
                           summary=f"{rows} problems x {c.num_generations} generations",
                           extra={"generations": gens, "failed": _count_lines(out.with_suffix(".failed.jsonl"))})

    def s_reject(self) -> StageResult:
        rep = self.p("data", "reject_report.json")
        self.distill("reject", "reject", "--src", str(self.p("data", "generations.jsonl")),
                     "--dst", str(self.p("data", "verified.jsonl")),
                     "--rejected", str(self.p("data", "rejected.jsonl")),
                     "--keep", "all", "--workers", str(self.cfg.workers), "--report", str(rep))
        r = _read_json(rep)
        kept = _count_lines(self.p("data", "verified.jsonl"))
        return StageResult("reject", rows_in=_count_lines(self.p("data", "generations.jsonl")), rows_out=kept,
                           throughput=f"{r['generations_per_s']:.1f} gen/s",
                           summary=f"{kept} verified rows", extra={"report": r})

    def s_tokenizer(self) -> StageResult:
        """The real Qwen2.5 BPE, trimmed to ``vocab_size`` ids (``--bpe-tokens``): on 2 CPU cores a
        151,936-row softmax would take most of every training step of the tiny student. The synthetic
        problems and their solutions use under 300 distinct ids; with 2048 ids a sample is ~15% more
        tokens than with 8192 (words split into more pieces) but the output layer is 4x cheaper."""
        bpe = self.cfg.vocab_size - 22  # the 22 added tokens follow the BPE ids
        self.distill("tokenizer", "tokenizer", "qwen2.5", "--output", str(self.p("tokenizer")), "--bpe-tokens", str(bpe))
        return StageResult("tokenizer", summary=f"Qwen2.5 tokenizer built offline, trimmed to its first {bpe} BPE "
                                                f"tokens + 22 added tokens ({self.cfg.vocab_size} ids)")

    def special_ids(self) -> dict[str, int]:
        from distilled.data.tokenizer import added_token_ids

        return added_token_ids(self.cfg.vocab_size - 22)

    def finetune_yaml(self) -> Path:
        """configs/finetune_qwen2_5_tiny_cpu.yaml with the demo student's shape, vocabulary and pad id
        (the base YAML's context, graph mode included, is kept as it is)."""
        src = "finetune_qwen2_5_tiny_cpu_kd.yaml" if self.cfg.kd else "finetune_qwen2_5_tiny_cpu.yaml"
        dst = self.p("configs", src)
        if dst.exists():
            return dst

        def edit(cfg: dict) -> None:
            mc = cfg["model"]["model_config"]
            shape = self.cfg.shape()
            mc.update(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_layers=shape.num_hidden_layers,
                      num_heads=shape.num_attention_heads, n_kv_heads=shape.num_key_value_heads,
                      intermediate_size=shape.intermediate_size, theta=shape.rope_theta)
            mc["pad_token_id"] = self.special_ids()["<|endoftext|>"]
            mc["seq_length"] = self.cfg.seq_length
            if self.cfg.kd:
                mc.update(kd_top_k=self.cfg.kd_top_k, kd_alpha=self.cfg.kd_alpha)
            cfg["lr_schedule"]["learning_rate"] = self.cfg.learning_rate
            # one checkpoint per epoch (the YAML's every-2-steps suits its short tests, not a run)
            rows = self.results_by_name("preprocess").rows_out or 1
            for cb in cfg.get("callbacks", []):
                if cb.get("type") == "CheckpointMonitor":
                    cb["save_checkpoint_steps"] = max(1, rows // self.cfg.workers)

        return self._derived_yaml(src, src, edit)

    def _derived_yaml(self, src: str, name: str, edit: Callable[[dict], None]) -> Path:
        """Copy one of the project's YAMLs with demo paths and sizes filled in."""
        import yaml

        cfg = yaml.safe_load((REPO / "configs" / src).read_text())
        edit(cfg)
        dst = self.p("configs", name)
        from distilled.io_utils import atomic_write

        with atomic_write(dst) as f:
            f.write(f"# Derived by `distill demo` from configs/{src}: demo paths and sizes only.\n")
            yaml.safe_dump(cfg, f, sort_keys=False)
        return dst

    def s_preprocess(self) -> StageResult:
        c = self.cfg
        handled, packed = self.p("data", "handled"), self.p("data", "packed")

        def handling(cfg: dict) -> None:
            dl = cfg["train_dataset"]["data_loader"]
            dl.update(path="json", data_files=str(self.p("data", "verified.jsonl")))
            h = dl["handler"][0]
            h["type"] = "CoTJsonlDataHandler"
            h["tokenizer"] = {"pretrained_model_dir": str(self.p("tokenizer"))}
            h.pop("generation_policy", None)
            h["num_proc"] = 1

        def packing(cfg: dict) -> None:
            dl = cfg["train_dataset"]["data_loader"]
            dl["dataset_path"] = str(handled)
            dl["handler"][0]["seq_length"] = c.seq_length
            dl["handler"][0]["seed"] = c.seed  # BFD emits rows longest-first; shuffle them
            dl["handler"][0]["pad_token"] = self.special_ids()["<|endoftext|>"]

        if c.kd:  # MindFormers' packed loader keeps 5 columns: the top-K ones come from distill preprocess
            self.distill("preprocess", "preprocess", "--input", str(self.p("data", "verified.jsonl")), "--format",
                         "cot", "--tokenizer", str(self.p("tokenizer")), "--seq-length", str(c.seq_length),
                         "--output", str(packed), "--seed", str(c.seed), "--quiet",
                         "--kd-sidecar", str(self.p("data", "generations.topk.bin")), "--kd-top-k", str(c.kd_top_k))
            handled = packed
        else:
            y1 = self._derived_yaml("data_process_handling.yaml", "data_process_handling.yaml", handling)
            y2 = self._derived_yaml("data_process_packing.yaml", "data_process_packing.yaml", packing)
            script = str(REPO / "toolkit" / "data_preprocess" / "huggingface" / "datasets_preprocess.py")
            self.run("preprocess", [c.python, script, "--config", str(y1), "--save_path", str(handled)])
            self.run("preprocess", [c.python, script, "--config", str(y2), "--save_path", str(packed)])
        import datasets

        ds = datasets.load_from_disk(str(packed))
        ends = [r[-1] for r in ds["actual_seq_len"]]
        docs = sum(len(r) for r in ds["actual_seq_len"])
        fill = sum(ends) / (len(ds) * c.seq_length) if len(ds) else 0.0
        handled_n = (_read_json(packed / "report.json")["samples"] if c.kd
                     else len(datasets.load_from_disk(str(handled))))
        return StageResult("preprocess", rows_in=_count_lines(self.p("data", "verified.jsonl")), rows_out=len(ds),
                           summary=f"{handled_n} tokenized samples -> {len(ds)} packed rows of {c.seq_length} "
                                   f"({fill:.1%} filled)",
                           extra={"handled": handled_n, "documents": docs, "packed_rows": len(ds), "fill": fill,
                                  "doc_lengths": [b - a for r in ds["actual_seq_len"] for a, b in zip([0] + r[:-1], r)]})

    def s_student(self) -> StageResult:
        from distilled.train.tiny_model import make_tiny_qwen2

        shape = self.cfg.shape()
        make_tiny_qwen2(self.p("student-init"), shape=shape, seed=self.cfg.seed, tokenizer_dir=self.p("tokenizer"))
        return StageResult("student", summary=f"random tiny Qwen2.5-architecture student ({shape.num_hidden_layers} "
                                              f"layers, hidden {shape.hidden_size}) saved as HF safetensors",
                           extra={"shape": asdict(shape)})

    def s_eval(self, name: str, model: Path, label: str) -> StageResult:
        out = self.p(name)
        self.distill(name, "eval", "--tasks", "synth", "--task-file", str(self.p("data", "test.jsonl")),
                     "--engine", "transformers", "--model", str(model), "--model-name", label, "--n", "1",
                     "--temperature", "0", "--max-tokens", str(self.cfg.eval_max_tokens), "--seed", str(self.cfg.seed),
                     "--system-prompt", SYSTEM_PROMPT, "--prompt-template", PROMPT_TEMPLATE,
                     "--batch-size", "64", "--output", str(out))
        from distilled.demo.report import eval_summary

        summ = eval_summary(out, self.p("data", "test.jsonl"))
        return StageResult(name, rows_in=summ["problems"], rows_out=summ["samples"],
                           summary=f"{label}: accuracy {summ['accuracy']:.1%}, boxed answer in {summ['answered']:.1%} "
                                   f"of outputs, {summ['truncated']:.1%} truncated",
                           extra=summ)

    def s_finetune(self) -> StageResult:
        c = self.cfg
        out = self.p("finetune")
        cmd = (f"run_mindformer.py --config {shlex.quote(str(self.finetune_yaml()))} --run_mode finetune "
               f"--load_checkpoint {shlex.quote(str(self.p('student-init')))} "
               f"--train_dataset_dir {shlex.quote(str(self.p('data', 'packed')))} "
               f"--output_dir {shlex.quote(str(out))} --epochs {c.epochs} --seed {c.seed}")
        self.run("finetune", ["bash", "scripts/msrun_launcher.sh", cmd, str(c.workers), str(_free_port()),
                              str(self.p("logs", "msrun")), "True", "1800"])  # JOIN True: wait for the workers
        ckpts = sorted(out.glob("checkpoint/rank_0/*.safetensors"), key=lambda f: f.stat().st_mtime)
        if not ckpts:
            raise StageFailed(f"stage 'finetune': no safetensors checkpoint under {out}/checkpoint/rank_0")
        self.distill("finetune", "convert", "mf-to-hf", str(ckpts[-1]), str(self.p("student-final")),
                     "--config", str(self.finetune_yaml()), "--tokenizer", str(self.p("tokenizer")))
        from distilled.train.mindformers_run import read_loss

        losses = read_loss(out / "loss.jsonl")
        tokens = sum(r.get("tokens", 0) for r in losses)
        secs = sum(r.get("step_time_s", 0.0) for r in losses)
        first, last = losses[0]["loss"], losses[-1]["loss"]
        return StageResult("finetune", rows_in=self.results_by_name("preprocess").rows_out, rows_out=len(losses),
                           throughput=f"{tokens / secs:.0f} tok/s" if secs else "",
                           summary=f"{len(losses)} steps on {c.workers} msrun CPU workers, loss {first:.3f} -> {last:.3f}; "
                                   f"checkpoint {ckpts[-1].name} -> student-final (HF)",
                           extra={"losses": [[r["step"], r["loss"]] for r in losses], "checkpoint": str(ckpts[-1])})

    def s_parity(self) -> StageResult:
        rep = self.p("parity")
        self.distill("parity", "parity", "--config", str(self.finetune_yaml()),
                     "--weights", str(self.p("student-init")), "--data", str(self.p("data", "packed")),
                     "--steps", str(self.cfg.parity_steps), "--check", "all", "--report", str(rep))
        r = _read_json(rep / "parity.json")
        return StageResult("parity", summary="MindSpore vs torch: " + ("PASS" if r["ok"] else "FAIL"),
                           extra={"parity": r})

    def results_by_name(self, name: str) -> StageResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def write_report(self) -> None:
        from distilled.demo.report import write_demo_report

        write_demo_report(self.out)


def register_cli(sub: argparse._SubParsersAction) -> None:
    """``distill demo``: run the whole pipeline at toy scale (``make demo``)."""
    p = sub.add_parser("demo", help="run the whole distillation pipeline offline on CPU at toy scale",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = from_args(DemoConfig, args)
    if cfg.kd and cfg.output == DemoConfig.output:  # keep the plain demo's results beside the KD one
        cfg.output = Path("runs/demo-kd")
    return run_demo(cfg)


def run_demo(cfg: DemoConfig) -> int:
    """Run every stage; on failure print the failing stage and return non-zero."""
    demo = Demo(cfg)
    try:
        demo.run_all()
    except StageFailed as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"demo done: {demo.p('report.md')}")
    return 0
