"""The Lightning training harness: precision and accelerator resolution, Lightning checkpoints that restore
model, optimizer, step and random states, the config fingerprint, the logging hook, and DDP on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillery.models import training

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def test_precision_and_accelerator_resolution():
    assert training.resolve_precision("auto", "cpu") == "32-true"
    assert training.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    with pytest.raises(ValueError, match="fp16.*bf16-mixed"):
        training.resolve_precision("16-mixed", "cuda")
    with pytest.raises(ValueError, match="one of 32-true"):
        training.resolve_precision("fp32", "cpu")
    with pytest.raises(ValueError, match="accelerator must be"):
        training.resolve_accelerator("tpu-please")
    if not torch.cuda.is_available():
        assert training.resolve_accelerator("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            training.resolve_accelerator("gpu")


def test_a_pods_cpu_limit_sizes_torchs_thread_pool(tmp_path, home, monkeypatch):
    """A pod limited to 1.5 CPUs gets 2 intra-op threads, not one per node core; an explicit setting wins."""
    from distillery.settings import get_settings

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert training.cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert training.cpu_limit(tmp_path) in (None, len(os.sched_getaffinity(0)))  # no quota: only affinity limits
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(training, "cpu_limit", lambda: 1)
        assert training.set_cpu_threads() == 1
        monkeypatch.setenv("DISTILLERY_CPU_THREADS", "2")
        get_settings.cache_clear()
        assert training.set_cpu_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise():
    """Set by the package before torch loads libgomp (spinning waiters made a shared-CPU step 10x slower), except in
    the predictor."""
    code = "import distillery, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
    # The predictor's entry point leaves libgomp's own default (spinning) unless the user chose.
    serve = "import distillery.serving.__main__, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", serve], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    # ... also when it runs under a process that imported the package (the default is inherited, marked as such).
    parent = "import distillery, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)"
    out = subprocess.run([sys.executable, "-c", parent, serve], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    out = subprocess.run([sys.executable, "-c", serve], env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_bad_settings_are_refused_before_training(home, monkeypatch):
    from distillery.settings import get_settings

    monkeypatch.setenv("DISTILLERY_PRECISION", "16-mixed")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="fp16"):
        training.make_fabric()
    monkeypatch.setenv("DISTILLERY_PRECISION", "auto")
    monkeypatch.setenv("DISTILLERY_DEVICES", "0")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="devices must be >= 1"):
        training.make_fabric()


def _run(ckpt, steps=6, every=2, on_log=None, seed=0, lr=0.1):
    """A loop that uses everything a checkpoint must restore: the weights, Adam's moments, the loop's generator
    and the global torch RNG (dropout)."""
    fabric = training.make_fabric()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    model, opt = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(seed)

    def step_fn(_):
        x = torch.randn(16, 4, generator=gen)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()
        return {"loss": loss.item()}

    metrics = training.resumable_loop("toy", model, opt, steps, ckpt, every, gen, step_fn, on_log, 1,
                                      {"seed": seed, "lr": lr}, fabric=fabric)
    return net, metrics


class Interrupt(Exception):
    pass


def test_resume_ends_with_the_uninterrupted_weights_and_metrics_reach_the_hook(tmp_path):
    logged = []
    full, m = _run(tmp_path / "full", on_log=lambda d, s: logged.append((s, d)))
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6] and set(logged[0][1]) == {"toy_loss"}
    assert m["toy_final_loss"] == pytest.approx(logged[-1][1]["toy_loss"])
    assert (tmp_path / "full" / "last.ckpt").exists()

    def stop(_, step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path / "ck", on_log=stop)
    torch.manual_seed(123)  # another process's global RNG: the checkpoint must restore it
    resumed, m2 = _run(tmp_path / "ck")
    assert m2["resumed_from_step"] == 4
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    # Same seed, same metrics.
    again, m3 = _run(tmp_path / "again")
    assert m3["toy_final_loss"] == m["toy_final_loss"]

    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path / "ck", seed=1)
    with pytest.raises(ValueError, match="past the requested"):
        _run(tmp_path / "ck", steps=3)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_identical_weights_and_one_writer(tmp_path):
    """torchrun starts 2 processes (gloo on 127.0.0.1); each samples its own batches, DDP averages the gradients."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_HOME=str(tmp_path / "home"), DISTILLERY_ACCELERATOR="cpu", DISTILLERY_DEVICES="2",
               DISTILLERY_CPU_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # 4 steps, then the same folder asked for 6 (resumes at 4), then an uninterrupted 6-step run: one launch.
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 1000}", str(REPO / "tests" / "ddp_train_vae.py"),
           f"{a}:4", f"{a}:6", f"{b}:6"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def ranks(out: Path, steps: int) -> dict:
        r0, r1 = [json.loads((out / f"rank{r}-{steps}.json").read_text()) for r in (0, 1)]
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["weights"] == r1["weights"], "the ranks ended with different weights"
        assert r0["first_batch"] != r1["first_batch"], "the ranks trained on the same batches"
        assert r0["resumed_from_step"] == r1["resumed_from_step"]
        return r0

    first, resumed, full = ranks(a, 4), ranks(a, 6), ranks(b, 6)
    assert (first["resumed_from_step"], resumed["resumed_from_step"], full["resumed_from_step"]) == (0, 4, 0)
    assert resumed["weights"] == full["weights"], "resumed DDP training did not end with the uninterrupted weights"

    # Only rank 0 logged and wrote the model and the checkpoint.
    logs = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert {entry["rank"] for entry in logs} == {0} and [e["step"] for e in logs] == [2, 4, 6]
    assert (a / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert sorted(p.name for p in (a / "ckpt").iterdir()) == ["last.ckpt"]


def _torchrun(script: str, args: list, home: Path, timeout: int = 600) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_HOME=str(home), DISTILLERY_ACCELERATOR="cpu", DISTILLERY_DEVICES="2",
               DISTILLERY_CPU_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={29500 + (os.getpid() + len(args)) % 1000}", str(REPO / "tests" / script), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """One DDP launch: SCott (stopped before step 3, then resumed to 4; and 4 uninterrupted), MoDE the same way,
    the dense baseline (4 steps)."""
    root = tmp_path_factory.mktemp("ddp_methods")
    for name in ("scott-resumed", "scott-full", "mode-resumed", "mode-full", "dense"):
        (root / name).mkdir()
    _torchrun("ddp_train_methods.py", [f"scott:{root / 'scott-resumed'}:4:3", f"scott:{root / 'scott-resumed'}:4",
                                       f"scott:{root / 'scott-full'}:4", f"mode:{root / 'mode-resumed'}:4:3",
                                       f"mode:{root / 'mode-resumed'}:4", f"mode:{root / 'mode-full'}:4",
                                       f"dense:{root / 'dense'}:4"], root / "home")
    return root


def _ranks(out: Path, steps: int = 4) -> dict:
    r0, r1 = [json.loads((out / f"rank{r}-{steps}.json").read_text()) for r in (0, 1)]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["seed"] != r1["seed"], "the ranks sampled the same batches"
    assert (r0["weights"], r0["optimizer"]) == (r1["weights"], r1["optimizer"]), "the ranks ended apart"
    assert r0["resumed_from_step"] == r1["resumed_from_step"]
    return r0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scott", "mode"])
def test_method_loops_under_ddp_stay_in_sync_and_resume_to_the_uninterrupted_weights(method_runs, method):
    """SCott: student, EMA target, discriminator and both optimizers; MoDE: the routed policy. The same on both
    ranks after each rank trained on its own batches, and a run stopped after its step-2 checkpoint and started
    again ends where the uninterrupted run does."""
    resumed, full = _ranks(method_runs / f"{method}-resumed"), _ranks(method_runs / f"{method}-full")
    assert (resumed["resumed_from_step"], full["resumed_from_step"]) == (2, 0)
    assert resumed["weights"] == full["weights"] and resumed["optimizer"] == full["optimizer"]
    logs = [json.loads(line) for line in (method_runs / f"{method}-resumed" / "log.jsonl").read_text().splitlines()]
    assert {e["rank"] for e in logs} == {0} and [e["step"] for e in logs] == [2, 4]
    assert sorted(p.name for p in (method_runs / f"{method}-full" / "ckpt").iterdir()) == ["last.ckpt"]
    saved = "unet/diffusion_pytorch_model.safetensors" if method == "scott" else "model.safetensors"
    assert (method_runs / f"{method}-full" / "model" / saved).exists()


@pytest.mark.slow
def test_dense_baseline_under_ddp(method_runs):
    assert _ranks(method_runs / "dense")["resumed_from_step"] == 0
    assert (method_runs / "dense" / "model" / "policy.json").exists()


@pytest.mark.slow
def test_a_training_step_under_ddp_has_one_run_and_registers_once(tmp_path):
    """The feature-network step trains and registers: run through `run_step` by 2 processes it makes one step run
    and one model version; run again it reuses that version on both ranks (no training, no second version)."""
    from mlflow import MlflowClient

    from distillery.data import build_image_caption_dataset

    build_image_caption_dataset(tmp_path / "ds", sources=("mnist",), resolution=16, per_class=6,
                                data_dir=REPO / "data")
    home = tmp_path / "home"
    _torchrun("ddp_train_methods.py", [f"register:{tmp_path / 'ds'}:{tmp_path / 'first' / 'net'}",
                                       f"register:{tmp_path / 'ds'}:{tmp_path / 'again' / 'net'}"], home)
    for folder, reused in (("first", 0.0), ("again", 1.0)):
        rows = [json.loads(line) for line in (tmp_path / folder / "register.jsonl").read_text().splitlines()]
        by_rank = {r.pop("rank"): r for r in rows}
        assert by_rank[1] == {} and by_rank[0]["evaluator_reused"] == reused and by_rank[0]["evaluator_version"] == 1
        assert (tmp_path / folder / "net" / "feature_net.safetensors").exists()

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'evaluator-mnist-16px'")
    assert [int(v.version) for v in versions] == [1]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags.get("task") for r in runs) == ["train-feature-net", "train-feature-net"]
