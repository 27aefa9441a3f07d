"""Training loops on Lightning Fabric: the privileged teacher and the PPO students (one loop, `train_ppo`), and the
DAgger and behaviour-cloning students (`train_dagger`). Each loop runs in one process (the discriminator and the
auxiliary head are stepped outside a DDP wrapper's forward, so they would not be averaged across ranks).

Students (`VARIANTS`), all built from the same seed so their actor-critics start equal:
  method   PPO on r = w_task r_task + w_style r_s with the motion prior, + c_aux auxiliary loss
  no-aux   the same without the auxiliary head
  no-disc  PPO on r_task, + c_aux auxiliary loss
  scratch  PPO on r_task from the student's observations only
  dagger   DAgger: the student acts (the teacher with probability beta_i = dagger_beta ** i at iteration i), the
           teacher labels every visited state with its action, the student regresses on minibatches drawn from
           the aggregate (MSE)
  bc       behaviour cloning: the same regression on the states the teacher visits (the teacher always acts), so
           the student never learns from its own mistakes: the distribution shift the motion prior is meant to avoid
Rewards are divided by a running std of the discounted return (CleanRL's NormalizeReward); a time-out bootstraps
r + gamma V(s_final).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distillery.models.training import LogFn, make_fabric, resumable_loop
from distillery.papers.teacher_prior.env import ACT, AUX, PROPRIO, TerrainConfig, TerrainVecEnv
from distillery.papers.teacher_prior.model import Discriminator, LocoPolicy, discriminator_loss, style_reward
from distillery.rl.ppo import PPOConfig, gae, ppo_update

VARIANTS = ("method", "no-aux", "no-disc", "dagger", "bc", "scratch")
IMITATION = ("dagger", "bc")  # trained by train_dagger, not PPO
TRAIN_SEEDS = (0, 100_000)  # terrain seeds of training; evaluation draws from above
EVAL_SEEDS = (100_000, 200_000)  # the held-out evaluation's
VALID_SEEDS = (200_000, 300_000)  # the sweep's trials': neither trained on nor in the held-out evaluation


@dataclass(frozen=True)
class PriorConfig:
    w_task: float = 0.5  # weight of the task reward (method, no-aux)
    w_style: float = 0.5  # weight of the style reward r_s (method, no-aux)
    c_aux: float = 0.5  # auxiliary MSE weight (method, no-disc)
    gp_weight: float = 5.0  # gradient penalty on teacher transitions
    disc_hidden: int = 64
    disc_lr: float = 1e-4
    disc_epochs: int = 2  # discriminator passes per PPO iteration
    disc_minibatches: int = 4
    dagger_beta: float = 0.5  # teacher-action probability decays as dagger_beta ** iteration
    dagger_epochs: int = 4  # minibatches per iteration: this many passes' worth of the iteration's new states
    dagger_lr: float = 1e-3
    dagger_buffer: int = 200_000  # most recent labelled states kept

    def check(self) -> "PriorConfig":
        problems = [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("w_task", "w_style", "c_aux", "gp_weight")
                    if getattr(self, k) < 0]
        problems += [f"{k} must be > 0, got {getattr(self, k)}" for k in ("disc_hidden", "disc_lr", "disc_epochs",
                                                                         "disc_minibatches", "dagger_epochs",
                                                                         "dagger_lr", "dagger_buffer")
                     if not getattr(self, k) > 0]
        if not 0 <= self.dagger_beta <= 1:
            problems.append(f"dagger_beta must be in [0, 1], got {self.dagger_beta}")
        if problems:
            raise ValueError("invalid PriorConfig: " + "; ".join(problems))
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def uses(variant: str) -> tuple[bool, bool]:
    """(motion prior, auxiliary head) of a PPO student."""
    if variant not in VARIANTS or variant in IMITATION:
        ppo_variants = [v for v in VARIANTS if v not in IMITATION]
        raise ValueError(f"a PPO student variant is one of {ppo_variants}, got {variant!r}")
    return variant in ("method", "no-aux"), variant in ("method", "no-disc")


def new_student(cfg: TerrainConfig, hidden: int, init_log_std: float, seed: int, aux: bool) -> LocoPolicy:
    """Every student's starting point: the actor-critic depends only on the seed (the aux head is built after it)."""
    torch.manual_seed(seed)
    return LocoPolicy(cfg.student_dim, ACT, hidden, init_log_std, aux_dim=AUX if aux else 0)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (per environment, reset at episode ends)."""

    def __init__(self, num_envs: int, gamma: float):
        self.ret, self.gamma = np.zeros(num_envs), gamma
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        out = np.empty_like(rewards, dtype=np.float64)
        for t in range(len(rewards)):
            self.ret = self.ret * self.gamma + rewards[t]
            b_mean, b_var, n = self.ret.mean(), self.ret.var(), len(self.ret)
            total = self.count + n
            delta = b_mean - self.mean
            self.mean += delta * n / total
            self.var = (self.var * self.count + b_var * n + delta ** 2 * self.count * n / total) / total
            self.count = total
            out[t] = rewards[t] / np.sqrt(self.var + 1e-8)
            self.ret = np.where(dones[t], 0.0, self.ret)
        return out


class MotionPrior:
    """The adversarial teacher-motion prior, attached to a PPO student like an add-on: it scores the student's
    proprioceptive transitions with the style reward and is stepped once per rollout against the teacher's."""

    def __init__(self, teacher_s: np.ndarray, teacher_next: np.ndarray, pc: PriorConfig, fabric,
                 generator: torch.Generator):
        dev = self.device = fabric.device
        if teacher_s.shape[-1] != PROPRIO or teacher_next.shape != teacher_s.shape:
            raise ValueError(f"teacher transitions must be (n, {PROPRIO}) pairs, got {teacher_s.shape} and "
                             f"{teacher_next.shape}")
        self.pc, self.gen = pc, generator
        self.teacher = (_tensor(teacher_s, dev), _tensor(teacher_next, dev))
        disc = Discriminator(PROPRIO, pc.disc_hidden).to(dev)
        disc.norm.update(self.teacher[0])  # fixed input scale: the teacher's motion statistics
        self.disc, self.opt = fabric.setup(disc, torch.optim.Adam(disc.parameters(), lr=pc.disc_lr))
        self.fabric = fabric

    @torch.no_grad()
    def reward(self, s: np.ndarray, s_next: np.ndarray) -> np.ndarray:
        d = self.disc(_tensor(s, self.device), _tensor(s_next, self.device))
        return style_reward(d).cpu().numpy()

    def update(self, s: np.ndarray, s_next: np.ndarray) -> dict:
        student = (_tensor(s, self.device), _tensor(s_next, self.device))
        n = len(student[0])
        stats: dict[str, list[float]] = {}
        for _ in range(self.pc.disc_epochs):
            perm = torch.randperm(n, generator=self.gen)
            for idx in torch.tensor_split(perm, self.pc.disc_minibatches):
                t_idx = torch.randint(len(self.teacher[0]), (len(idx),), generator=self.gen)
                loss, st = discriminator_loss(self.disc, (self.teacher[0][t_idx], self.teacher[1][t_idx]),
                                              (student[0][idx], student[1][idx]), self.pc.gp_weight)
                self.opt.zero_grad(set_to_none=True)
                self.fabric.backward(loss)
                self.opt.step()
                for k, v in st.items():
                    stats.setdefault(k, []).append(v)
        return {k: float(np.mean(v)) for k, v in stats.items()}


def _tensor(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def _one_process(fabric) -> None:
    if fabric.world_size != 1:
        raise ValueError("teacher-prior trains each policy in one process (DISTILLERY_DEVICES=1); run students in "
                         "parallel as separate steps instead")
    if fabric.device.type == "cpu":
        torch.set_num_threads(1)  # small MLPs between MuJoCo steps: threads only spin


def _curve_point(curve: list, steps: int, recent: list) -> None:
    if recent:
        curve.append([steps, float(np.mean([r for r, _ in recent])), float(np.mean([f for _, f in recent]))])


def train_ppo(out_dir: Path, cfg: TerrainConfig, ppo: PPOConfig, *, role: str, env_steps: int, rollout_steps: int,
              gamma: float = 0.99, seed: int = 0, pc: PriorConfig | None = None, rollouts: dict | None = None,
              checkpoint_dir: Path | str | None = None, on_log: LogFn | None = None, log_every: int = 5) -> dict:
    """role "teacher" (privileged observations, task reward) or a PPO student variant (`uses`). `rollouts` (the
    teacher's, `rollouts.load`) give the prior's teacher transitions and the auxiliary targets' scale."""
    from distillery.papers.teacher_prior.policy import save_policy

    cfg, ppo, pc = cfg.check(), ppo.check(), (pc or PriorConfig()).check()
    teacher = role == "teacher"
    prior, aux = (False, False) if teacher else uses(role)
    if (prior or aux) and rollouts is None:
        raise ValueError(f"the {role} student needs the teacher's rollouts (its motion prior / auxiliary targets)")
    if env_steps < 1 or rollout_steps < 1 or not 0 < gamma <= 1:
        raise ValueError(f"need env_steps >= 1, rollout_steps >= 1 and 0 < gamma <= 1, got {env_steps}, "
                         f"{rollout_steps}, {gamma}")
    fabric = make_fabric()
    _one_process(fabric)
    key = "teacher" if teacher else "student"
    if teacher:
        torch.manual_seed(seed)
        net = LocoPolicy(cfg.teacher_dim, ACT, ppo.hidden, ppo.init_log_std)
    else:
        net = new_student(cfg, ppo.hidden, ppo.init_log_std, seed, aux)
    model, opt = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=ppo.lr, eps=1e-5))
    dev = fabric.device  # MuJoCo steps on the CPU; the networks (and the update) live here
    gen = torch.Generator().manual_seed(seed + 1)
    env = TerrainVecEnv(cfg, ppo.num_envs, seed=seed, terrain_seeds=TRAIN_SEEDS)
    motion = MotionPrior(rollouts["proprio"], rollouts["proprio_next"], pc, fabric, gen) if prior else None
    if aux:
        aux_mean, aux_std = _tensor(rollouts["aux"].mean(0), dev), _tensor(rollouts["aux"].std(0) + 1e-3, dev)
    scaler = RewardScaler(ppo.num_envs, gamma)
    obs = env.reset()
    iters = max(1, -(-env_steps // (rollout_steps * ppo.num_envs)))
    recent: list[tuple[float, bool]] = []
    curve: list[list[float]] = []
    disc_curve: list[list[float]] = []
    last: dict = {}
    done_steps = 0

    def step_fn(it: int) -> dict:
        nonlocal obs, done_steps
        b = {k: [] for k in ("obs", "actions", "logprobs", "values", "r_task", "done", "boot", "p", "p_next", "aux")}
        for _ in range(rollout_steps):
            x = _tensor(obs[key], dev)
            net.norm.update(x)
            with torch.no_grad():
                action, logp, _, value = (v.cpu() for v in net(x, generator=gen))
            nxt, r, term, trunc, info = env.step(action.numpy())
            p_next = nxt["proprio"].copy()
            boot = np.zeros(ppo.num_envs)
            for i, final in enumerate(info["final"]):
                if final is not None:
                    p_next[i] = final["proprio"]
                    recent.append((float(info["episode_return"][i]), bool(info["fell"][i])))
                    if trunc[i]:  # a time-out, not a fall: bootstrap from the state it ended in
                        with torch.no_grad():
                            boot[i] = float(net.value(_tensor(final[key][None], dev)))
            for k, v in (("obs", obs[key]), ("actions", action.numpy()), ("logprobs", logp.numpy()),
                         ("values", value.numpy()), ("r_task", r), ("done", term | trunc), ("boot", boot),
                         ("p", obs["proprio"]), ("p_next", p_next), ("aux", obs["aux"])):
                b[k].append(v)
            obs = nxt
        a = {k: np.asarray(v) for k, v in b.items()}  # (T, N, ...)
        reward = a["r_task"].astype(np.float64)
        if motion is not None:
            flat_p, flat_n = a["p"].reshape(-1, PROPRIO), a["p_next"].reshape(-1, PROPRIO)
            r_style = motion.reward(flat_p, flat_n).reshape(reward.shape)
            reward = pc.w_task * reward + pc.w_style * r_style
            last.update(motion.update(flat_p, flat_n), style_reward=float(r_style.mean()))
            disc_curve.append([done_steps + reward.size, last["disc_accuracy"], last["style_reward"]])
        scaled = scaler(reward, a["done"]) + gamma * a["boot"]
        with torch.no_grad():
            next_values = np.concatenate([a["values"][1:], net.value(_tensor(obs[key], dev)).cpu().numpy()[None]])
        adv, ret = gae(scaled, a["values"], next_values, a["done"].astype(np.float64), np.full(reward.shape, gamma),
                       ppo.lam)
        dim = a["obs"].shape[-1]
        batch = {"obs": a["obs"].reshape(-1, dim), "actions": a["actions"].reshape(-1, ACT),
                 "logprobs": a["logprobs"].ravel(), "advantages": adv.ravel(), "returns": ret.ravel(),
                 "values": a["values"].ravel()}
        batch = {k: _tensor(v, dev) for k, v in batch.items()}
        extra = None
        if aux:
            batch["aux_target"] = (_tensor(a["aux"].reshape(-1, AUX), dev) - aux_mean) / aux_std

            def extra(mb):
                mse = ((net.predict_aux(mb["obs"]) - mb["aux_target"]) ** 2).mean()
                return pc.c_aux * mse, {"aux_mse": mse.item()}
        stats = ppo_update(fabric, model, opt, ppo, batch, gen, extra_loss=extra)
        done_steps += reward.size
        del recent[:-100]
        _curve_point(curve, done_steps, recent)
        last.update(stats, task_reward=float(a["r_task"].mean()),
                    episode_return=curve[-1][1] if curve else float("nan"),
                    fall_rate=curve[-1][2] if curve else float("nan"))
        return {"loss": stats["loss"]}

    def log(metrics: dict, step: int) -> None:
        if on_log:
            on_log({**metrics, **{f"{role}_{k}": v for k, v in last.items() if np.isfinite(v)}}, step)

    t0 = time.perf_counter()
    # The plain module, not Fabric's wrapper: fabric.save unwraps a wrapper it finds inside a container, fabric.load
    # does not, so a resumed run could not load its own checkpoint.
    modules = torch.nn.ModuleDict({"policy": net, **({"disc": motion.disc} if motion else {})})
    opts = {"optimizer": opt, **({"disc_optimizer": motion.opt} if motion else {})}
    metrics = resumable_loop(role, modules, opts, iters, checkpoint_dir, 10, gen, step_fn, log if on_log else None,
                             log_every, dict(cfg=cfg.as_dict(), ppo=ppo.as_dict(), prior=pc.as_dict(), role=role,
                                             env_steps=env_steps, rollout_steps=rollout_steps, gamma=gamma, seed=seed),
                             fabric=fabric)
    wall = time.perf_counter() - t0
    extra_meta = {"aux_mean": aux_mean.tolist(), "aux_std": aux_std.tolist()} if aux else {}
    save_policy(Path(out_dir), net.cpu(), cfg, role=role, curve=curve, disc_curve=disc_curve,
                prior=pc.as_dict() if prior else None, c_aux=pc.c_aux if aux else 0.0, **extra_meta)
    return {**metrics, "iterations": float(iters), "env_steps": float(done_steps),
            "env_steps_per_s": (done_steps - 0) / max(wall, 1e-9),
            **{f"final_{k}": float(v) for k, v in last.items() if np.isfinite(v)}}


def train_dagger(out_dir: Path, cfg: TerrainConfig, teacher_dir: Path, *, hidden: int, env_steps: int,
                 rollout_steps: int, num_envs: int, seed: int = 0, init_log_std: float = -0.5,
                 pc: PriorConfig | None = None, checkpoint_dir: Path | str | None = None,
                 on_log: LogFn | None = None, log_every: int = 5, role: str = "dagger") -> dict:
    """DAgger (role "dagger") or behaviour cloning (role "bc": the teacher always acts) from the frozen teacher (it
    must exist: the student refuses to start without it)."""
    from distillery.papers.teacher_prior.policy import load_policy, save_policy

    cfg, pc = cfg.check(), (pc or PriorConfig()).check()
    if role not in IMITATION:
        raise ValueError(f"an imitation student's role is one of {IMITATION}, got {role!r}")
    teacher = load_policy(Path(teacher_dir), role="teacher")  # raises clearly when the artifact is missing
    for p in teacher.net.parameters():
        p.requires_grad_(False)
    if teacher.cfg.teacher_dim != cfg.teacher_dim:
        raise ValueError(f"the teacher was trained on {teacher.cfg.teacher_dim} privileged observations, this "
                         f"environment gives {cfg.teacher_dim}")
    fabric = make_fabric()
    _one_process(fabric)
    net = new_student(cfg, hidden, init_log_std, seed, aux=False)
    model, opt = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=pc.dagger_lr))
    dev = fabric.device
    teacher.net.to(dev)
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 2)
    env = TerrainVecEnv(cfg, num_envs, seed=seed, terrain_seeds=TRAIN_SEEDS)
    obs = env.reset()
    iters = max(1, -(-env_steps // (rollout_steps * num_envs)))
    xs, ys = [], []
    recent: list[tuple[float, bool]] = []
    curve: list[list[float]] = []
    last: dict = {}
    done_steps = 0

    def step_fn(it: int) -> dict:
        nonlocal obs, done_steps
        beta = 1.0 if role == "bc" else pc.dagger_beta ** it
        for _ in range(rollout_steps):
            x = _tensor(obs["student"], dev)
            net.norm.update(x)
            label = teacher.net.act_deterministic(_tensor(obs["teacher"], dev)).cpu().numpy()
            use_teacher = rng.random(num_envs) < beta
            # The student's own action only where it drives (never at beta 1: BC, DAgger's first iteration).
            act = label if use_teacher.all() else np.where(use_teacher[:, None], label,
                                                           net.act_deterministic(x).cpu().numpy())
            xs.append(obs["student"])
            ys.append(label)
            obs, _, _, _, info = env.step(act)
            recent.extend((float(info["episode_return"][i]), bool(info["fell"][i]))
                          for i, f in enumerate(info["final"]) if f is not None)
        del xs[:-max(1, pc.dagger_buffer // num_envs)], ys[:-max(1, pc.dagger_buffer // num_envs)]
        X, Y = _tensor(np.concatenate(xs), dev), _tensor(np.concatenate(ys), dev)
        losses = []
        # dagger_epochs passes' worth of minibatches of the new data, drawn from the whole aggregate: the cost of an
        # iteration stays fixed as the aggregate grows.
        for _ in range(pc.dagger_epochs * -(-rollout_steps * num_envs // 256)):
            idx = torch.randint(len(X), (256,), generator=gen)
            loss = ((net.mean_action(X[idx]) - Y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            opt.step()
            losses.append(loss.item())
        done_steps += rollout_steps * num_envs
        del recent[:-100]
        _curve_point(curve, done_steps, recent)
        last.update(bc_loss=float(np.mean(losses)), beta=beta, dataset=float(len(X)),
                    episode_return=curve[-1][1] if curve else float("nan"))
        return {"loss": float(np.mean(losses))}

    def log(metrics: dict, step: int) -> None:
        if on_log:
            on_log({**metrics, **{f"{role}_{k}": v for k, v in last.items() if np.isfinite(v)}}, step)

    t0 = time.perf_counter()
    metrics = resumable_loop(role, model, opt, iters, checkpoint_dir, 10, gen, step_fn, log if on_log else None,
                             log_every, dict(cfg=cfg.as_dict(), prior=pc.as_dict(), hidden=hidden, env_steps=env_steps,
                                             rollout_steps=rollout_steps, num_envs=num_envs, seed=seed),
                             fabric=fabric)
    wall = time.perf_counter() - t0
    save_policy(Path(out_dir), net.cpu(), cfg, role=role, curve=curve, disc_curve=[])
    return {**metrics, "iterations": float(iters), "env_steps": float(done_steps),
            "env_steps_per_s": done_steps / max(wall, 1e-9),
            **{f"final_{k}": float(v) for k, v in last.items() if np.isfinite(v)}}
