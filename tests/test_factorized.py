"""Factorized video generation: the plain text-to-video keyframe model, anchor training and the
three ways to inject an anchor frame at sampling."""

from dataclasses import replace

import pytest
import torch

from kvideo.diffusion import SamplerSpec, sample, text_guided, with_known
from kvideo.inference.conditioning import Prompts, TextVideoCondition
from kvideo.inference.loading import load_bundle
from kvideo.inference.sampling import KeyframeOptions, sample_keyframes
from kvideo.registry import load_config
from kvideo.train.engine import train
from kvideo.train.stages.keyframe import KeyframeStage

from test_keyframe import KEYFRAME_CONFIG, PROMPT, tiny_keyframe_overrides

T2V = [KEYFRAME_CONFIG.parent / "shapes_t2v.yaml"]


def t2v_overrides(run, shapes_shards, movq_run, t2i_run, **extra):
    return tiny_keyframe_overrides(run, shapes_shards, movq_run, t2i_run, **extra)


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory, shapes_shards, movq_run, t2i_run):
    run = tmp_path_factory.mktemp("t2v")
    train(load_config(T2V, t2v_overrides(run, shapes_shards, movq_run, t2i_run, **{
        "recipe.anchor.enabled": "true", "recipe.anchor.timestep": "true"})))
    return run


def test_the_text_to_video_model_has_no_first_frame_channels_and_trains_anchored(t2v_run):
    bundle = load_bundle(t2v_run, "keyframe")
    assert bundle.denoiser.unet.cfg.in_channels == bundle.denoiser.unet.cfg.out_channels == 4
    assert '"keyframe/anchor_frame"' in (t2v_run / "metrics.jsonl").read_text()


def test_anchor_training_leaves_the_given_frame_out_of_the_loss(tmp_path, shapes_shards, movq_run, t2i_run):
    overrides = t2v_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run, **{
        "recipe.anchor.enabled": "true", "recipe.anchor.frame": 2, "recipe.anchor.drop": 0.0})
    stage = KeyframeStage(load_config(T2V, overrides), torch.device("cpu"))
    model = stage.build_model()
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 4, 8, 8, generator=g), "caption": [PROMPT, PROMPT],
             "motion_score": torch.tensor([0.1, 0.2])}
    seen = []

    def loss_with(offset, frame=2):
        def net(x_t, t, cond):
            seen.append(cond)
            out = model(x_t, t, cond).clone()
            out[:, :, frame] += offset
            return out

        torch.manual_seed(3)
        return stage.loss(model, {"main": net}, batch, 0, "main")[0]

    with torch.no_grad():
        assert torch.equal(loss_with(0.0), loss_with(50.0))  # the anchor frame is an input, not a target
        assert loss_with(50.0, frame=1) > loss_with(0.0, frame=1) + 100
    cond = seen[0]
    assert cond.anchor_frame == 2 and torch.equal(cond.anchor, batch["latents"][:, :, 2]) and cond.has_anchor.all()
    with pytest.raises(ValueError, match="recipe.anchor.frame"):
        KeyframeStage(load_config(T2V, overrides + ["recipe.anchor.frame=4"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="recipe.anchor trains a text-to-video model"):
        KeyframeStage(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "r2", shapes_shards, movq_run,
                                                                          t2i_run, **{"recipe.anchor.enabled": "true"})),
                      torch.device("cpu"))


def test_the_anchor_call_gives_the_frame_clean_with_its_own_timestep(t2v_run):
    model = load_bundle(t2v_run, "keyframe").denoiser
    g = torch.Generator().manual_seed(1)
    x, anchor = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, motion = torch.tensor([300, 700]), torch.tensor([0.1, 0.2])
    text = model.context([PROMPT, PROMPT])
    scale = 300.0
    with torch.no_grad():
        cond = TextVideoCondition(text, motion, scale, anchor, torch.tensor([1.0, 0.0]), anchor_frame=1,
                                  anchor_timestep=True)
        x_anchored = x.clone()
        x_anchored[0, :, 1] = anchor[0]
        frame_t = torch.tensor([[300, 0, 300], [700, 700, 700]])
        expected = model.unet(x_anchored, frame_t, text.tokens, text.mask, motion_score=motion * scale)
        assert torch.equal(model(x, t, cond), expected)
        plain = model.unet(x, t, text.tokens, text.mask, motion_score=motion * scale)
        assert torch.equal(model(x, t, TextVideoCondition(text, motion, scale)), plain)
        assert torch.allclose(model(x, t, cond)[1], plain[1], atol=1e-5)  # no anchor for sample 1
    with pytest.raises(ValueError, match="go together"):
        TextVideoCondition(Prompts([PROMPT]), motion[:1], scale, anchor[:1])


@pytest.mark.parametrize("mode", ["first_step", "every_step", "clean"])
def test_anchor_injection_at_sampling(t2v_run, mode):
    bundle = load_bundle(t2v_run, "keyframe")
    model, rc = bundle.denoiser, bundle.recipe
    anchor = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    spec = SamplerSpec("ddim", steps=3)
    options = KeyframeOptions(spec, text_guidance=2.0, num_frames=3, anchor=mode, anchor_frame=1)
    with torch.no_grad():
        got = sample_keyframes(bundle, [PROMPT], anchor, 0.1, options, generator=torch.Generator().manual_seed(2))
        # by hand: the text-guided call, x_T and the held frame as each mode says
        cond = TextVideoCondition(model.context([PROMPT]), torch.tensor([0.1]), rc.motion.scale)
        if mode == "clean":
            cond = replace(cond, anchor=anchor, has_anchor=torch.ones(1), anchor_frame=1, anchor_timestep=True)
        model_fn = text_guided(model, cond, replace(cond, text=model.unconditional_context(1)), 2.0)
        x_T = torch.randn((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(2))
        frame = torch.zeros(1, 1, 3, 1, 1, dtype=torch.bool)
        frame[:, :, 1] = True
        if mode == "first_step":
            x_T[:, :, 1] = anchor
        else:
            model_fn = with_known(model_fn, bundle.schedule, rc.diffusion.target, anchor[:, :, None], frame)
        expected = sample(model_fn, bundle.schedule, x_T, spec, target=rc.diffusion.target, data_range=rc.latent_scale)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        if mode != "first_step":
            assert torch.allclose(got[:, :, 1], anchor, atol=1e-4)  # held: the anchor comes back exactly
        plain = sample_keyframes(bundle, [PROMPT], anchor, 0.1, replace(options, use_image=False),
                                 generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(plain, got, atol=1e-4)  # no anchor: plain text-to-video
    with pytest.raises(ValueError, match="anchor_frame"):
        KeyframeOptions(spec, num_frames=3, anchor_frame=3)


def test_a_first_frame_model_config_cannot_claim_text_conditioning(tmp_path, shapes_shards, movq_run, t2i_run):
    from kvideo.inference.loading import build_stage_denoiser

    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path, shapes_shards, movq_run, t2i_run,
                                                                 **{"recipe.conditioning": "text"}))
    with pytest.raises(ValueError, match="in_channels = out_channels"):
        build_stage_denoiser(cfg)


def test_the_pipeline_anchors_a_text_to_video_model_on_its_first_frame(t2v_run, t2i_run):
    from kvideo.pipeline import Pipeline, PipelineConfig

    pipe = Pipeline(PipelineConfig(t2i=str(t2i_run), keyframe=str(t2v_run), first_frame_scale=1))
    kw = dict(t2i_sampler="ddim", t2i_steps=2, keyframe_steps=2, num_keyframes=3, fps_preset="low", progress=False)
    held = pipe([PROMPT], anchor="every_step", anchor_frame=0, **kw)
    assert held.settings["keyframes"]["anchor"] == "every_step" and held.settings["first_frame"]["source"] == "t2i"
    first_step = pipe([PROMPT], anchor="first_step", **kw)
    plain = pipe([PROMPT], first_frame=False, **kw)  # no first frame: plain text-to-video keyframes
    assert not torch.allclose(held.keyframes, first_step.keyframes, atol=1e-3)
    assert not torch.allclose(first_step.keyframes, plain.keyframes, atol=1e-3)


def test_the_shapesworld_rewriter_removes_exactly_the_motion():
    from kvideo.data.shapesworld import caption, parse_caption
    from kvideo.inference.rewrite import build_rewriter

    rewriter = build_rewriter("shapesworld")
    attrs = dict(background="white", color="red", shape="circle", direction="left", speed="fast")
    for seed in range(8):  # the canonical caption and its paraphrases
        text = caption(attrs, paraphrase_rng=seed)
        assert rewriter([text]) == ["a red circle on a white background"], text
    still = caption(dict(attrs, direction="still", speed="none"))
    assert rewriter([still]) == ["a red circle on a white background"]
    for a in ({**attrs, "color": "blue", "shape": "square", "background": "black"},):
        out = rewriter([caption(a)])[0]
        assert all(v in out for v in ("blue", "square", "black")) and "moving" not in out
        with pytest.raises(ValueError):
            parse_caption(out)  # no motion left to parse
    assert rewriter(["a cat on a sofa"]) == ["a cat on a sofa"]  # not ShapesWorld: kept
    assert build_rewriter("identity")(["x"]) == ["x"] and build_rewriter("identity").describe() == {"kind": "identity"}
    with pytest.raises(ValueError, match="rewriter"):
        build_rewriter("gpt")


def test_the_pipeline_draws_the_first_frame_from_the_rewritten_prompt(t2v_run, t2i_run):
    from kvideo.pipeline import Pipeline, PipelineConfig

    pipe = Pipeline(PipelineConfig(t2i=str(t2i_run), keyframe=str(t2v_run), first_frame_scale=1))
    kw = dict(t2i_sampler="ddim", t2i_steps=2, keyframe_steps=2, num_keyframes=3, fps_preset="low", progress=False)
    out = pipe([PROMPT], rewrite="shapesworld", **kw)
    assert out.settings["first_frame"]["rewriter"] == "shapesworld"
    assert out.first_frame_prompts == ["a red circle on a black background"]
    plain = pipe([PROMPT], **kw)
    assert plain.first_frame_prompts == [PROMPT] and plain.settings["first_frame"]["rewriter"] == "identity"
    assert not torch.allclose(out.first_frames, plain.first_frames, atol=1e-3)  # another prompt, another image
    with pytest.raises(ValueError, match="rewriter"):
        pipe.settings(rewrite="gpt", fps_preset="low")


def tiny_causal_lm(path):
    """A tiny random GPT-2 and a word-level tokenizer, written as a local transformers checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "describe", "only", "the", "first", "frame", "video", ":", "a", "red", "circle",
             "moving", "left", "quickly", "on", "black", "background", "still", "image", "of", "blue", "square"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    return path


def test_the_llm_rewriter_runs_a_local_model_with_its_template_and_limits(tmp_path, monkeypatch):
    from kvideo.inference.rewrite import LLMRewriter, build_rewriter

    path = tiny_causal_lm(tmp_path / "lm")
    template = "describe only the first frame : {prompt} image :"
    rewriter = build_rewriter(f"llm:{path}", template=template, max_new_tokens=3)
    assert isinstance(rewriter, LLMRewriter) and rewriter.describe()["template"] == template
    got = rewriter([PROMPT])[0]
    # the reference: the same model and tokenizer called directly on the filled-in template
    inputs = rewriter.tokenizer(template.format(prompt=PROMPT), return_tensors="pt")
    out = rewriter.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 3  # the generation limit
    expected = rewriter.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert got == (expected.splitlines()[0].strip() if expected else PROMPT)
    # a model that says nothing: the original prompt
    monkeypatch.setattr(rewriter.model, "generate", lambda input_ids, **kw: input_ids)
    assert rewriter([PROMPT]) == [PROMPT]
    with pytest.raises(ValueError, match="prompt"):
        LLMRewriter(path, template="no placeholder")
    with pytest.raises(FileNotFoundError, match="model directory"):
        LLMRewriter(tmp_path / "missing")
