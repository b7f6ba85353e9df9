"""Reference conditioning as a kind of conditioning (issue 28): `IdentityCondition` around any
condition, name tags, reference guidance against a direct computation, the identity bank, and
reference dropout."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from kvideo.diffusion import GuidanceTerm, Schedule, stack_branches, text_guided, text_image_guided
from kvideo.inference.conditioning import (
    IdentityCondition, ImageCondition, KeyframeCondition, Names, Prompts, References, TextContext, select_rows,
)
from kvideo.inference.identity import IdentityBank, ReferenceSet, encode_references, read_reference
from kvideo.inference.loading import Bundle, build_stage_denoiser
from kvideo.inference.sampling import FirstFrameOptions, KeyframeOptions, identity_guided, sample_keyframes
from kvideo.models.identity import IdentityAttention
from kvideo.models.movq import MoVQ, movq_config
from kvideo.registry import load_config
from kvideo.train.stages.diffusion import LatentDiffusionStage

from conftest import T2I_CONFIG, tiny_t2i_overrides
from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides

IDENTITY = {"model.identity_attention": "[false,true]"}


def identity_denoiser(config=T2I_CONFIG, overrides=tiny_t2i_overrides, seed=0, gates=None, **extra):
    """A tiny denoiser with identity attention on its second level; `gates` sets every gate (and
    randomises the name tags' map), as after training."""
    torch.manual_seed(seed)
    args = ("/tmp/unused", "/tmp/unused", "/tmp/unused") + (("/tmp/unused",) if config == KEYFRAME_CONFIG else ())
    cfg = load_config([config], overrides(*args, **{**IDENTITY, **extra}))
    denoiser = build_stage_denoiser(cfg).eval()
    if gates is not None:
        with torch.no_grad():
            for m in denoiser.modules():
                if isinstance(m, IdentityAttention):
                    m.gate.fill_(gates)
            if denoiser.reference.name_proj is not None:
                torch.nn.init.normal_(denoiser.reference.name_proj.weight, std=0.5)
    return denoiser, cfg


def references(b=2, r=2, present=None, names=None, seed=1) -> References:
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(b, r, dtype=torch.bool) if present is None else torch.as_tensor(present, dtype=torch.bool)
    return References(torch.randn(b, r, 4, 8, 8, generator=g), present, names)


def image_inputs(b=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([5, 700])[:b]


PROMPTS = ["Ada moves left on a white background", "Bix and Ada on a black background"]


def test_identity_condition_is_the_base_call_at_init_and_for_samples_without_references():
    x, t = image_inputs()
    base = ImageCondition(Prompts(PROMPTS))
    denoiser, _ = identity_denoiser()
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, IdentityCondition(base, references())), denoiser(x, t, base))
        denoiser, _ = identity_denoiser(gates=1.0)
        plain = denoiser(x, t, base)
        # sample 0 has no present entry: exactly the base prediction; sample 1 has one: not
        got = denoiser(x, t, IdentityCondition(base, references(present=[[0, 0], [1, 0]])))
        assert torch.equal(got[0], plain[0]) and not torch.allclose(got[1], plain[1], atol=1e-4)
        assert torch.equal(denoiser(x, t, IdentityCondition(base, references()).without_references()), plain)
        # an absent entry's tokens are masked out: its latent does not matter
        refs = references(present=[[1, 0], [1, 0]])
        other = replace(refs, latents=torch.cat([refs.latents[:, :1], torch.randn(2, 1, 4, 8, 8)], dim=1))
        assert torch.allclose(denoiser(x, t, IdentityCondition(base, refs)),
                              denoiser(x, t, IdentityCondition(base, other)), atol=1e-6)


def test_name_tags_bind_entries_and_encode_inside_the_forward_as_given():
    x, t = image_inputs()
    base = ImageCondition(Prompts(PROMPTS))
    denoiser, _ = identity_denoiser(gates=1.0)
    names = Names([["Ada", "Bix"], ["Bix", ""]])
    with torch.no_grad():
        tags = denoiser.name_embeddings(names.rows)
        assert tags.shape == (2, 2, denoiser.text.cfg.out_dim) and torch.equal(tags[1, 1], torch.zeros_like(tags[1, 1]))
        assert torch.equal(tags[0, 1], tags[1, 0])  # one name, one tag
        from_names = denoiser(x, t, IdentityCondition(base, references(names=names)))
        from_tags = denoiser(x, t, IdentityCondition(base, references(names=tags)))
        untagged = denoiser(x, t, IdentityCondition(base, references()))
        swapped = denoiser(x, t, IdentityCondition(base, references(names=Names([["Bix", "Ada"], ["Bix", ""]]))))
    assert torch.allclose(from_names, from_tags, atol=1e-6)
    assert not torch.allclose(from_names, untagged, atol=1e-4)
    assert not torch.allclose(from_names[0], swapped[0], atol=1e-4) and torch.allclose(from_names[1], swapped[1])
    # the tag map starts at zero: at init the tags change nothing
    fresh, _ = identity_denoiser()
    with torch.no_grad():
        for m in fresh.modules():
            if isinstance(m, IdentityAttention):
                m.gate.fill_(1.0)
        assert torch.equal(fresh(x, t, IdentityCondition(base, references(names=names))),
                           fresh(x, t, IdentityCondition(base, references())))


def test_rows_and_branches_of_identity_conditions():
    refs = references(b=3, names=Names([["Ada", ""], ["Bix", "Ada"], ["Cato", ""]]))
    cond = IdentityCondition(ImageCondition(Prompts(["a", "b", "c"], torch.tensor([False, True, False]))), refs, 0.5)
    rows = torch.tensor([True, False, True])
    picked = select_rows(cond, rows)
    assert picked.base.text.texts == ["a", "c"] and picked.references.names.rows == [["Ada", ""], ["Cato", ""]]
    assert torch.equal(picked.references.latents, refs.latents[rows]) and picked.scale == 0.5
    context = TextContext(torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.bool))
    tagged = IdentityCondition(ImageCondition(context), replace(refs, names=torch.randn(3, 2, 16)))
    stacked = stack_branches([tagged, tagged.without_references()])
    assert stacked.references.latents.shape[0] == 6 and stacked.references.present[3:].sum() == 0
    with pytest.raises(ValueError, match="references has batch size 3, the text 2"):
        IdentityCondition(ImageCondition(Prompts(["a", "b"])), refs)
    with pytest.raises(ValueError, match=r"present \(b, r\)"):
        References(torch.zeros(2, 2, 4, 8, 8), torch.ones(2, 3, dtype=torch.bool))


def test_a_model_without_identity_attention_names_what_is_missing():
    cfg = load_config([T2I_CONFIG], tiny_t2i_overrides("/tmp/u", "/tmp/u", "/tmp/u"))
    plain = build_stage_denoiser(cfg)
    x, t = image_inputs()
    with pytest.raises(ValueError, match="model.identity_attention"):
        plain(x, t, IdentityCondition(ImageCondition(Prompts(PROMPTS)), references()))
    with pytest.raises(ValueError, match="recipe.identity.encoder"):
        identity_denoiser(**{"recipe.identity.encoder": "huge"})


def test_reference_guidance_is_the_formula_in_one_forward():
    """text guidance + w_R (eps_c - eps_c,no ref), the branches made by `identity_guided`, from one
    forward of three branches, against the three predictions computed one by one."""
    denoiser, cfg = identity_denoiser(gates=1.0)
    bundle = SimpleNamespace(denoiser=denoiser, movq=tiny_movq(), cfg=cfg, recipe=cfg.recipe, device=torch.device("cpu"),
                             stage="t2i", path="tiny")
    cond, uncond = (ImageCondition(text) for text in denoiser.guidance_contexts(PROMPTS))
    refs = ReferenceSet(torch.rand(2, 2, 3, 32, 32) * 2 - 1, [["Ada", ""], ["Bix", "Ada"]],
                        torch.tensor([[True, False], [True, True]]))
    (c, u), terms = identity_guided(bundle, [cond, uncond], refs, scale=0.7, guidance=2.5)
    assert len(terms) == 1 and terms[0].scale == 2.5 and c.scale == 0.7
    batches = []
    hook = denoiser.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    x, t = image_inputs()
    with torch.no_grad():
        got = text_guided(denoiser, c, u, 4.0, terms)(x, t)
        assert batches == [6]
        e_c, e_u, e_n = (denoiser(x, t, k) for k in (c, u, terms[0].branch))
    hook.remove()
    assert torch.allclose(got, e_c + 4.0 * (e_c - e_u) + 2.5 * (e_c - e_n), atol=1e-5)
    assert not torch.allclose(e_c, e_n, atol=1e-4)
    # w_R = 0: no branch; no references: the branches as they were
    assert identity_guided(bundle, [cond, uncond], refs, 1.0, 0.0)[1] == []
    assert identity_guided(bundle, [cond, uncond], None, 1.0, 3.0) == ([cond, uncond], [])


def test_three_way_guidance_with_both_terms_is_the_formula():
    def net(x, t, cond):
        return x * cond["a"][:, None] + cond["b"][:, None]

    x, t = torch.randn(2, 5), torch.tensor([3, 7])
    ti, i, n, mf, nr = ({"a": torch.tensor([v, v + 1.0]), "b": torch.tensor([v / 2, v])} for v in (1.0, 2.0, 4.0, 3.0, 5.0))
    got = text_image_guided(net, ti, i, n, 5.0, 2.0, [GuidanceTerm(mf, 1.5), GuidanceTerm(nr, 0.5)])(x, t)
    e = {k: net(x, t, c) for k, c in dict(ti=ti, i=i, n=n, mf=mf, nr=nr).items()}
    expected = e["n"] + 2.0 * (e["i"] - e["n"]) + 5.0 * (e["ti"] - e["i"]) + 1.5 * (e["ti"] - e["mf"]) \
        + 0.5 * (e["ti"] - e["nr"])
    assert torch.allclose(got, expected, atol=1e-5)


def tiny_movq() -> MoVQ:
    torch.manual_seed(3)
    return MoVQ(movq_config("shapes", ch=8, norm_groups=4, n_embed=32)).eval()


def test_sample_keyframes_with_references_adds_identity_to_every_branch():
    denoiser, cfg = identity_denoiser(KEYFRAME_CONFIG, tiny_keyframe_overrides, gates=1.0)
    bundle = Bundle("keyframe", denoiser, tiny_movq(), cfg, Schedule.from_name("squaredcos_cap_v2", 1000), "tiny")
    refs = ReferenceSet(torch.rand(2, 1, 3, 32, 32) * 2 - 1, [["Ada"], ["Bix"]])
    first = torch.randn(2, 4, 8, 8)
    batches = []
    denoiser.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))

    def keyframes(**changes):
        batches.clear()
        options = KeyframeOptions.from_recipe(cfg, sampler="ddim", steps=2, num_frames=3, **changes)
        return sample_keyframes(bundle, PROMPTS, first, 1.0, options, generator=torch.Generator().manual_seed(0),
                                references=changes.pop("refs", refs))

    with_refs = keyframes()
    assert batches == [6, 6]  # three branches, each with the references
    guided = keyframes(reference_guidance=2.0)
    assert batches == [8, 8] and not torch.allclose(guided, with_refs, atol=1e-4)
    options = KeyframeOptions.from_recipe(cfg, sampler="ddim", steps=2, num_frames=3)
    plain = sample_keyframes(bundle, PROMPTS, first, 1.0, options, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, with_refs, atol=1e-4)
    absent = ReferenceSet(refs.images, refs.names, torch.zeros(2, 1, dtype=torch.bool))
    same = sample_keyframes(bundle, PROMPTS, first, 1.0, options, generator=torch.Generator().manual_seed(0),
                            references=absent)
    assert torch.allclose(same, plain, atol=1e-5)


def test_options_read_the_recipes_identity_section():
    _, cfg = identity_denoiser(**{"recipe.identity.scale": 0.5, "recipe.identity.guidance": 3.0})
    options = FirstFrameOptions.from_recipe(cfg)
    assert (options.identity_scale, options.reference_guidance) == (0.5, 3.0)
    assert FirstFrameOptions.from_recipe(cfg, reference_guidance=1.0).reference_guidance == 1.0
    with pytest.raises(ValueError, match="identity_scale"):
        FirstFrameOptions(identity_scale=-1.0)


def test_encode_references_fits_the_trained_size_and_tags_names():
    denoiser, cfg = identity_denoiser(gates=1.0)
    bundle = SimpleNamespace(denoiser=denoiser, movq=tiny_movq(), cfg=cfg, recipe=cfg.recipe, device=torch.device("cpu"),
                             stage="t2i", path="tiny")
    refs = ReferenceSet(torch.rand(1, 2, 3, 64, 48) * 2 - 1, [["Ada", ""]], torch.tensor([[True, False]]))
    encoded = encode_references(bundle, refs)
    assert encoded.latents.shape == (1, 2, 4, 8, 8)  # data.size 32x32, the MoVQ's factor 4
    assert encoded.names.shape == (1, 2, 16) and encoded.present.tolist() == [[True, False]]
    assert encode_references(bundle, refs, names=False).names is None


# ---------------------------------------------------------------------------------------------- the bank


def test_identity_bank_round_trips_and_finds_names_in_captions(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = IdentityBank({name: torch.rand(3, 16, 16, generator=g) * 2 - 1 for name in ("Ada", "Bix", "Cato")})
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = IdentityBank.load(path)
    assert loaded.names == ["Ada", "Bix", "Cato"]
    assert all(torch.equal(loaded.entries[n], bank.entries[n]) for n in bank.names)
    assert loaded.named_in("Bix, then Ada, on a white background; not Adam") == ["Bix", "Ada"]
    refs = loaded.references_for(["Bix and Ada walk", "a red circle", "Cato alone"])
    assert refs.names == [["Bix", "Ada"], ["", ""], ["Cato", ""]]
    assert refs.present.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(refs.images[0, 1], bank.entries["Ada"]) and refs.images[1].abs().sum() == 0
    assert loaded.references_for(["x"], names=[["Cato"]], max_entries=2).names == [["Cato", ""]]
    with pytest.raises(ValueError, match="no entry 'Otto'; it holds Ada, Bix, Cato"):
        loaded.references_for(["x"], names=[["Otto"]])
    loaded.add("Dune", torch.ones(3, 8, 4))  # fitted to the bank's 16 x 16
    assert loaded.entries["Dune"].shape == (3, 16, 16) and torch.allclose(loaded.entries["Dune"], torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="non-blank word"):
        loaded.add("a/b", torch.zeros(3, 16, 16))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        IdentityBank.load(tmp_path / "junk.safetensors")


def test_bank_from_image_files(tmp_path):
    import cv2
    import numpy as np

    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :, 2] = 255  # BGR: red
    cv2.imwrite(str(tmp_path / "ada.png"), image)
    bank = IdentityBank.from_images({"Ada": tmp_path / "ada.png"})
    assert torch.equal(bank.entries["Ada"][0], torch.ones(8, 8)) and torch.equal(bank.entries["Ada"][1], -torch.ones(8, 8))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.png"):
        read_reference(tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------- training


def test_reference_dropout_rate_and_repeats():
    rc = OmegaConf.create({"latent_scale": 1.0, "identity": {"dropout": 0.3, "names": True}})
    stage = SimpleNamespace(identity=True, movq=tiny_movq(), rc=rc, device=torch.device("cpu"), reference_memo=None)
    b = 4000
    batch = {"references": torch.zeros(b, 2, 3, 8, 8), "reference_present": torch.tensor([[True, False]] * b),
             "reference_names": [["Ada", ""]] * b}
    torch.manual_seed(0)
    with torch.no_grad():
        refs = LatentDiffusionStage.references(stage, batch)
    kept = refs.present[:, 0].float().mean().item()
    assert abs(kept - 0.7) < 0.03 and not refs.present[:, 1].any()
    assert refs.names.rows[0] == ["Ada", ""]
    small = {k: v[:2] for k, v in batch.items()}
    with torch.no_grad():
        repeated = LatentDiffusionStage.references(stage, small, repeats=3)
    assert repeated.latents.shape[0] == 6 and repeated.names.rows == [["Ada", ""]] * 6
    assert LatentDiffusionStage.references(SimpleNamespace(identity=False), batch) is None


def test_name_dropout_leaves_identity_to_the_reference():
    from kvideo.inference.identity import without_names

    assert without_names("Ada moving left and Adam still, then Ada again", ["Ada"], "someone") == \
        "someone moving left and Adam still, then someone again"
    rc = OmegaConf.create({"latent_scale": 1.0, "identity": {"dropout": 0.0, "names": True, "name_dropout": 0.4,
                                                             "name_word": "someone"}})
    stage = SimpleNamespace(identity=True, movq=tiny_movq(), rc=rc, device=torch.device("cpu"), reference_memo=None)
    b = 3000  # rows: both references present; only the first; none (dropped or missing)
    rows = [[True, True], [True, False], [False, False]] * (b // 3)
    batch = {"references": torch.zeros(b, 2, 3, 8, 8), "reference_present": torch.tensor(rows),
             "reference_names": [["Ada", "Bix"]] * b}
    captions = ["Ada moving left and Bix standing still"] * b
    torch.manual_seed(0)
    with torch.no_grad():
        refs = LatentDiffusionStage.references(stage, batch)
    out = LatentDiffusionStage.unnamed(stage, captions, batch, refs)
    both, first, neither = out[0::3], out[1::3], out[2::3]
    assert set(both) == {captions[0], "someone moving left and someone standing still"}
    assert set(first) == {captions[0], "someone moving left and Bix standing still"}  # Bix has no reference
    assert set(neither) == {captions[0]}  # nothing to take identity from: the names stay
    share = sum(c != captions[0] for c in both + first) / (2 * b // 3)
    assert abs(share - 0.4) < 0.04
    # repeated rows (a t2i batch's frames) follow their sample's references
    small = {k: v[:3] for k, v in batch.items()}
    with torch.no_grad():
        refs3 = LatentDiffusionStage.references(stage, small, repeats=2)
    stage.rc.identity.name_dropout = 1.0
    out3 = LatentDiffusionStage.unnamed(stage, [c for c in captions[:3] for _ in range(2)], small, refs3)
    assert out3[4:] == [captions[0]] * 2 and "Ada" not in out3[0] and "Bix" in out3[2]
    stage.rc.identity.name_dropout = 0.0  # off: the captions as given, and no random draw
    state = torch.get_rng_state()
    assert LatentDiffusionStage.unnamed(stage, captions, batch, refs) == captions
    assert torch.equal(state, torch.get_rng_state())


def test_identity_loss_is_one_minus_the_cosine_of_decoded_frame_zero_and_reference():
    from kvideo.models.identity_encoder import IdentityEncoder, IdentityEncoderConfig

    torch.manual_seed(0)
    encoder = IdentityEncoder(IdentityEncoderConfig()).eval().requires_grad_(False)
    rc = OmegaConf.create({"latent_scale": 0.5, "identity": {"loss_max_t": 200}, "diffusion": {"target": "eps"}})
    stage = SimpleNamespace(identity_encoder=encoder, movq=tiny_movq().requires_grad_(False), rc=rc,
                            schedule=Schedule.from_name("squaredcos_cap_v2", 1000))
    b = 5
    x_t, out = torch.randn(b, 4, 3, 8, 8), torch.randn(b, 4, 3, 8, 8, requires_grad=True)
    t = torch.tensor([10, 150, 500, 20, 30])  # sample 2: too noisy
    present = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)  # 3: two; 4: none
    refs = References(torch.randn(b, 2, 4, 8, 8), present)
    loss, n = LatentDiffusionStage.identity_loss(stage, x_t, t, out, refs)
    assert n == 2
    expected = []
    for i in (0, 1):
        x0 = stage.schedule.predict_x0(x_t[i:i + 1], t[i:i + 1], out[i:i + 1], "eps")[:, :, 0]
        frame = stage.movq.decode(x0 / 0.5).clamp(-1, 1)  # 32 px: resized to the encoder's 64
        ref = stage.movq.decode(refs.latents[i:i + 1, 0] / 0.5).clamp(-1, 1)
        frame, ref = (torch.nn.functional.interpolate(v, size=(64, 64), mode="bilinear", antialias=True)
                      for v in (frame, ref))
        expected.append(1 - (encoder.embed(frame) * encoder.embed(ref)).sum())
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)
    loss.backward()
    assert out.grad[[0, 1]].abs().sum() > 0 and out.grad[[2, 3, 4]].abs().sum() == 0
    none, n = LatentDiffusionStage.identity_loss(stage, x_t, torch.full((b,), 900), out, refs)
    assert n == 0 and float(none) == 0.0 and none.requires_grad
