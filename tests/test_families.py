"""The family matrix: every supported diffusers family, built tiny from configs, trains and round-trips its LoRA.

For each family and two schedulers: a rollout, one NFT step that changes only LoRA parameters, and (first scheduler)
save -> fresh pipeline -> `load_lora_weights` -> the trainer's policy's images; plus `check_family`, which checks the
family's frame against the pipeline's own first-order solver.
"""

import pytest
import torch
from datasets import Dataset
from tiny_families import EXTRA_FAMILIES, build_tiny_pipeline
from tiny_families import FAMILIES as BUILT_IN

from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer
from trl_nft.families import UnsupportedPipelineError, get_adapter, get_family
from trl_nft.families.check import check_family


FAMILIES = {**BUILT_IN, **EXTRA_FAMILIES}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow circles"]
REFUSED = {"lcm", "sana-sprint"}
TRAINED = [name for name in FAMILIES if name not in REFUSED]
# Two schedulers per family; every listed scheduler for one flow family (SD3) and one UNet family (SD1.x).
CASES = [
    (name, scheduler)
    for name in TRAINED
    for scheduler in FAMILIES[name].schedulers[: None if name in ("sd3", "sd15") else 2]
]


def contrast(prompts, images, **kwargs):
    """Per-image pixel standard deviation: any image-dependent score gives NFT a signal."""
    return images.flatten(1).std(dim=1).tolist()


def _max_len(name):
    return FAMILIES[name].call_kwargs.get("max_sequence_length")


def _extra(name):
    """The family's sampling arguments other than those the trainer sets (SANA's resolution binning)."""
    reserved = ("max_sequence_length", "guidance_scale", "true_cfg_scale")
    return {k: v for k, v in FAMILIES[name].call_kwargs.items() if k not in reserved}


def _config(tmp_path, name, **overrides):
    spec = FAMILIES[name]
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        num_generations=2,
        per_device_train_batch_size=4,
        num_inference_steps=2,
        eval_num_inference_steps=2,
        resolution=spec.size,
        lora_r=2,
        lora_alpha=2,
        learning_rate=3e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if _max_len(name) is not None:
        kwargs["max_sequence_length"] = _max_len(name)
    if _extra(name):
        kwargs["pipeline_kwargs"] = _extra(name)
    kwargs.update(overrides)
    return DiffusionNFTConfig(**kwargs)


def _sample(pipe, name, adapter):
    kwargs = adapter.call_kwargs(_max_len(name), 1.0)  # holds the config's pipeline_kwargs
    size = FAMILIES[name].size
    out = pipe(
        prompt=PROMPTS[:2],
        num_inference_steps=2,
        height=size,
        width=size,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        output_type="pt",
        **kwargs,
    )
    return out.images.float()


@pytest.mark.parametrize("name", TRAINED)
def test_family_frame_matches_the_pipelines_own_solver(name):
    pipe = build_tiny_pipeline(name)
    adapter = get_adapter(pipe, resolution=FAMILIES[name].size, pipeline_kwargs=_extra(name))
    assert check_family(adapter, PROMPTS[:2], max_sequence_length=_max_len(name)) < 1e-4
    # Training forwards run in training mode: the velocity must not depend on it (HiDream changes its output layout).
    size = FAMILIES[name].size
    cond = adapter.conditioning(
        PROMPTS[:2], guidance_scale=1.0, height=size, width=size, max_sequence_length=_max_len(name)
    )
    x0, _ = adapter.rollout(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, height=size, width=size,
                            max_sequence_length=_max_len(name))  # fmt: skip
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        adapter.denoiser.eval()
        v_eval = adapter.velocity(x0, t, cond)
        adapter.denoiser.train()
        v_train = adapter.velocity(x0, t, cond)
    torch.testing.assert_close(v_train, v_eval, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,scheduler", CASES)
def test_family_trains_lora_and_round_trips(name, scheduler, tmp_path):
    pipe = build_tiny_pipeline(name, scheduler)
    family = get_family(pipe)
    denoiser = getattr(pipe, family.denoiser)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    trainer = DiffusionNFTTrainer(
        pipe,
        reward_funcs=contrast,
        args=_config(tmp_path, name),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    trainer.train()
    assert trainer._rollout_grid.numel() >= 2
    assert bool(((trainer._rollout_grid > 0) & (trainer._rollout_grid <= 1)).all())
    after = dict(denoiser.named_parameters())
    # peft moves a wrapped layer's own weights under `.base_layer`; those must be untouched.
    frozen = {n: p for n, p in after.items() if "lora_" not in n}
    assert all(torch.equal(p.detach(), before[n.replace(".base_layer", "")]) for n, p in frozen.items())
    changed = [n for n, p in after.items() if "lora_" in n and (n not in before or not torch.equal(p, before[n]))]
    assert any(".default." in n for n in changed)
    if scheduler != FAMILIES[name].schedulers[0]:
        return
    # The saved adapter, loaded the diffusers way into a fresh pipeline, samples what the trainer's policy samples.
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    with trainer.evaluation_weights() as policy:
        expected = _sample(policy, name, trainer.adapter)
    fresh = build_tiny_pipeline(name, scheduler)
    base = _sample(fresh, name, trainer.adapter)
    fresh.load_lora_weights(str(out))
    loaded = _sample(fresh, name, trainer.adapter)
    assert not torch.allclose(base, expected, atol=1e-4), "the LoRA must change the images for this check to mean much"
    torch.testing.assert_close(loaded, expected, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_few_step_distilled_pipelines_are_refused_with_the_reason(name):
    with pytest.raises(UnsupportedPipelineError, match="consistency-distilled"):
        get_family(build_tiny_pipeline(name))


def test_unknown_pipeline_class_names_the_supported_ones_and_the_docs():
    from diffusers import DiffusionPipeline

    class MyPipeline(DiffusionPipeline):
        pass

    with pytest.raises(UnsupportedPipelineError, match=r"'MyPipeline'.*StableDiffusion3Pipeline.*adding_a_family"):
        get_family(MyPipeline())


def test_a_subclass_of_a_supported_pipeline_is_served():
    from diffusers import StableDiffusionPipeline

    class MyPipeline(StableDiffusionPipeline):
        pass

    pipe = build_tiny_pipeline("sd15")
    pipe.__class__ = MyPipeline
    assert get_family(pipe).name == "sd"


def test_adding_a_family_page_runs_as_written(tmp_path, monkeypatch):
    """docs/adding_a_family.md: its declaration, check and training blocks, run on a tiny Krea 2 pipeline."""
    import functools
    import re
    from pathlib import Path

    import trl_nft
    from trl_nft.families import FAMILIES

    text = (Path(__file__).parent.parent / "docs" / "adding_a_family.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    declare, check, train = blocks[1], blocks[2], blocks[3]
    saved = list(FAMILIES)
    monkeypatch.chdir(tmp_path)
    # The page's config with the tiny test sizes injected.
    tiny = functools.partial(_config, tmp_path, "krea2", output_dir="krea2-nft")
    monkeypatch.setattr(trl_nft, "DiffusionNFTConfig", lambda output_dir: tiny())
    namespace = {
        "pipe": build_tiny_pipeline("krea2"),
        "my_reward": contrast,
        "prompts": Dataset.from_dict({"prompt": PROMPTS}),
    }
    try:
        FAMILIES[:] = [f for f in FAMILIES if f.name != "krea2"]
        exec(declare, namespace)
        exec(check, namespace)
        exec(train, namespace)
    finally:
        FAMILIES[:] = saved
    assert namespace["error"] < 1e-4
    assert (tmp_path / "krea2-nft" / "pytorch_lora_weights.safetensors").is_file()
