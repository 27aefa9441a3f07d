"""tiny-sd steps: feature network, VAE, UNet, evaluation. Training resumes from the last checkpoint
when the same step is started again after an interruption (see `checkpoint_dir`)."""

from __future__ import annotations

from pathlib import Path

import json

from distillery.steps import (EVALUATOR_FILE, checkpoint_dir, checkpoint_key, dir_hash, evaluator_identity,
                              load_dataset, log_metrics)


def train_feature_net(*, dataset_dir: str, out_dir: str, steps: int, seed: int) -> dict:
    """The evaluator: a classifier trained on the real images, whose penultimate layer is the feature space of
    FD and KID. It is a versioned artifact, registered once per dataset revision as `evaluator-<sources>-<res>px`
    with the alias `rev-<key>` (key: the data's content hash and the training parameters); a later run on the same
    data downloads that version instead of training another, so every run's FD is measured in the same space."""
    import mlflow

    from distillery.models import image_eval
    from distillery.models.training import broadcast, global_rank
    from distillery.platform import registry

    ds = load_dataset(dataset_dir)
    train, hold = ds.train(), ds.holdout()
    name = f"evaluator-{'-'.join(ds.manifest['sources'])}-{ds.manifest['resolution']}px"
    key = checkpoint_key(data=ds.manifest["content_sha256"], steps=steps, seed=seed, net=image_eval.FeatureNet.__name__)
    alias, out = f"rev-{key}", Path(out_dir)
    existing = registry.by_alias(name, alias) if global_rank() == 0 else None
    if not broadcast(existing is not None):  # under DDP rank 0 decides: every rank trains, or none does
        net = image_eval.train_feature_net(train.images, train.labels, len(ds.classes), steps=steps, seed=seed)
    if global_rank() != 0:
        return {}  # the other DDP processes only train: rank 0 saves, registers (once) and reports
    if existing is not None:
        net, version = image_eval.FeatureNet.load(registry.download(name, alias, dst=out)), str(existing.version)
    else:
        net.save(out)
        version = registry.register_dir(name, out, mlflow.active_run().info.run_id,
                                        tags={"data_sha256": ds.manifest["content_sha256"], "steps": steps, "seed": seed})
        registry.set_alias(name, alias, version)
    (out / EVALUATOR_FILE).write_text(json.dumps({"name": name, "version": version, "key": key, "alias": alias}))
    acc = float((net.predict(hold.images) == hold.labels).mean())
    return {"feature_net_holdout_acc": acc, "evaluator_reused": float(existing is not None),
            **evaluator_identity(out_dir)}


def train_vae(*, dataset_dir: str, out_dir: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    from distillery.models import tiny_sd
    from distillery.models.image_eval import make_grid
    from distillery.models.training import global_rank
    from distillery.platform import tracking

    ds = load_dataset(dataset_dir)
    cfg = tiny_sd.TinySDConfig(resolution=int(ds.manifest["resolution"]))
    ckpt = checkpoint_dir("train-vae", data=ds.manifest["content_sha256"], steps=steps, batch_size=batch_size, lr=lr,
                          seed=seed, cfg=cfg)
    metrics = tiny_sd.train_vae(ds.train(), Path(out_dir), cfg=cfg, steps=steps, batch_size=batch_size, lr=lr,
                                seed=seed, checkpoint_dir=ckpt, on_log=log_metrics)
    if global_rank() != 0:
        return metrics  # the other DDP processes only train; rank 0 logs
    originals, recon = tiny_sd.reconstruct(Path(out_dir), ds.holdout().images[:8])
    tracking.log_image(make_grid([*originals, *recon], nrow=8), "reconstructions.png")
    return metrics


def train_unet(*, dataset_dir: str, vae_dir: str, out_dir: str, steps: int, batch_size: int, lr: float,
               cond_dropout: float, seed: int) -> dict:
    from distillery.models import tiny_sd

    ds = load_dataset(dataset_dir)
    cfg = tiny_sd.TinySDConfig(resolution=int(ds.manifest["resolution"]))
    ckpt = checkpoint_dir("train-unet", data=ds.manifest["content_sha256"], vae=dir_hash(Path(vae_dir)), steps=steps,
                          batch_size=batch_size, lr=lr, cond_dropout=cond_dropout, seed=seed, cfg=cfg)
    return tiny_sd.train_unet(ds.train(), Path(vae_dir), Path(out_dir), cfg=cfg, steps=steps, batch_size=batch_size,
                              lr=lr, cond_dropout=cond_dropout, seed=seed, checkpoint_dir=ckpt, on_log=log_metrics)


def evaluate(*, model_dir: str, dataset_dir: str, feature_net_dir: str, num_per_class: int, steps: int,
             guidance_scale: float, seed: int) -> dict:
    """Frechet distance and conditional accuracy on held-out prompts with fixed seeds, plus a sample grid."""
    from diffusers import StableDiffusionPipeline

    from distillery.models import image_eval
    from distillery.platform import tracking

    ds = load_dataset(dataset_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    net = image_eval.FeatureNet.load(Path(feature_net_dir))
    result = image_eval.evaluate_text_to_image(pipe, ds.holdout(), net, num_per_class=num_per_class, steps=steps,
                                               guidance_scale=guidance_scale, seed=seed)
    tracking.log_image(result.pop("grid"), "samples.png")
    return {**{k: v for k, v in result.items() if isinstance(v, (int, float))}, **evaluator_identity(feature_net_dir)}


def dir_hash(path: Path) -> str:
    from distillery.platform.storage import sha256_file

    return ",".join(sha256_file(p)[:12] for p in sorted(path.rglob("*")) if p.is_file())
