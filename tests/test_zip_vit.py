"""ZipIt!, Git Re-Basin and averaging on Vision Transformers, each model keeping its head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merganser.errors import MerganserError
from merganser.zipping.vit import align_vit, zip_vit

D, HEADS, HD, FF, LAYERS = 16, 2, 8, 24, 2


def vit(seed: int) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FF,
        image_size=8, patch_size=4, num_channels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    net = ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # random LayerNorms and embeddings, so a wrong permutation shows
        for name, p in net.named_parameters():
            if "layernorm" in name or "embeddings" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0))
    return net


def head(seed: int, classes: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, classes)


def permuted(net: nn.Module, seed: int) -> nn.Module:
    """The same function: residual features, GELU units, heads and dims inside heads shuffled
    (q and k dims together, v dims with the o_proj columns that read them)."""
    g = torch.Generator().manual_seed(seed)
    res = torch.randperm(D, generator=g)
    out = vit(0)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    new = {}
    for k, v in sd.items():
        if k in ("embeddings.cls_token", "embeddings.position_embeddings"):
            new[k] = v[..., res]
        elif k.startswith("embeddings.") or "layernorm" in k:
            new[k] = v[res]
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        mlp = torch.randperm(FF, generator=g)
        hp = torch.randperm(HEADS, generator=g)
        qk = torch.cat([hp[h] * HD + torch.randperm(HD, generator=g) for h in range(HEADS)])
        vo = torch.cat([hp[h] * HD + torch.randperm(HD, generator=g) for h in range(HEADS)])
        for name, rows in (("q_proj", qk), ("k_proj", qk), ("v_proj", vo)):
            new[f"{p}attention.{name}.weight"] = sd[f"{p}attention.{name}.weight"][rows][:, res]
            new[f"{p}attention.{name}.bias"] = sd[f"{p}attention.{name}.bias"][rows]
        new[f"{p}attention.o_proj.weight"] = sd[f"{p}attention.o_proj.weight"][res][:, vo]
        new[f"{p}attention.o_proj.bias"] = sd[f"{p}attention.o_proj.bias"][res]
        new[f"{p}mlp.fc1.weight"] = sd[f"{p}mlp.fc1.weight"][mlp][:, res]
        new[f"{p}mlp.fc1.bias"] = sd[f"{p}mlp.fc1.bias"][mlp]
        new[f"{p}mlp.fc2.weight"] = sd[f"{p}mlp.fc2.weight"][res][:, mlp]
        new[f"{p}mlp.fc2.bias"] = sd[f"{p}mlp.fc2.bias"][res]
    assert set(new) == set(sd)
    out.load_state_dict(new)
    out.res_perm = res  # type: ignore[assignment]
    return out


def permuted_head(h: nn.Linear, res: torch.Tensor) -> nn.Linear:
    out = nn.Linear(D, h.out_features)
    with torch.no_grad():
        out.weight.copy_(h.weight[:, res])
        out.bias.copy_(h.bias)
    return out


X = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(9))


def logits(net: nn.Module, h: nn.Linear, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return h(net(pixel_values=x).last_hidden_state[:, 0])


def test_the_permuted_copy_is_the_same_function() -> None:
    a, ha = vit(1), head(5)
    b = permuted(a, 2)
    assert torch.allclose(logits(a, ha), logits(b, permuted_head(ha, b.res_perm)), atol=1e-5)


@pytest.mark.parametrize("matcher", ["zipit", "permute", "weight"])
@pytest.mark.parametrize("stop", [1, LAYERS])
def test_a_permuted_copy_zips_back_to_the_model(matcher: str, stop: int) -> None:
    a, ha = vit(1), head(5)
    b = permuted(a, 2)
    hb = permuted_head(ha, b.res_perm)
    z = zip_vit([a, b], [ha, hb], X.split(16), matcher=matcher, stop=stop)
    want = logits(a, ha)
    with torch.no_grad():
        for task in (0, 1):
            assert torch.allclose(z(X, task), want, atol=1e-4), (matcher, stop, task)


def test_averaging_a_permuted_copy_is_not_the_model() -> None:
    a, ha = vit(1), head(5)
    b = permuted(a, 2)
    z = zip_vit([a, b], [ha, permuted_head(ha, b.res_perm)], X.split(16), matcher="average")
    with torch.no_grad():
        assert not torch.allclose(z(X, 0), logits(a, ha), atol=1e-2)


def test_zipit_keeps_each_head_and_the_rest_of_each_model() -> None:
    a, b = vit(1), vit(2)
    ha, hb = head(5, 3), head(6, 4)
    z = zip_vit([a, b], [ha, hb], X.split(16), matcher="zipit")
    with torch.no_grad():
        assert z(X, 0).shape == (48, 3) and z(X, 1).shape == (48, 4)
    # a full zip is a complete ViTModel: save it and load it back with transformers
    assert type(z.trunk).__name__ == "ViTModel" and len(z.trunk.layers) == LAYERS
    part = zip_vit([a, b], [ha, hb], X.split(16), matcher="zipit", stop=1)
    assert len(part.trunk.layers) == 1 and part.trunk.config.num_hidden_layers == 1
    # the partial zip's branch 1 is model b's own second block, final norm and head
    assert torch.equal(part.branches[1].layers[0].mlp.fc1.weight, b.layers[1].mlp.fc1.weight)
    assert torch.equal(part.branches[1].head.weight, hb.weight)
    # the merged embeddings average matched features: the merged CLS token is a mix of both
    assert not torch.equal(part.trunk.embeddings.cls_token, a.embeddings.cls_token)


def test_refit_keeps_an_exact_zip_and_brings_a_rough_one_closer() -> None:
    a, ha = vit(1), head(5)
    b = permuted(a, 2)
    hb = permuted_head(ha, b.res_perm)
    z = zip_vit([a, b], [ha, hb], X.split(16), matcher="zipit", refit=1e-8)
    with torch.no_grad():
        assert torch.allclose(z(X, 1), logits(a, ha), atol=1e-3)
    c, hc = vit(3), head(7)
    plain = zip_vit([a, c], [ha, hc], X.split(16), matcher="average")
    fitted = zip_vit([a, c], [ha, hc], X.split(16), matcher="average", refit=1e-4)
    with torch.no_grad():
        for task, (net, h) in enumerate(((a, ha), (c, hc))):
            own = logits(net, h)
            before = (plain(X, task) - own).square().mean()
            after = (fitted(X, task) - own).square().mean()
            assert after < 0.5 * before, (task, float(before), float(after))


def test_bad_input_is_one_line() -> None:
    from transformers import ViTConfig, ViTModel

    a, b = vit(1), vit(2)
    with pytest.raises(MerganserError, match="unknown matcher 'rebasin'"):
        zip_vit([a, b], [head(1), head(2)], [X], matcher="rebasin")  # type: ignore[arg-type]
    with pytest.raises(MerganserError, match=r"stop must be 1\.\.2"):
        zip_vit([a, b], [head(1), head(2)], [X], stop=3)
    with pytest.raises(MerganserError, match=r"head 1 must be an nn\.Linear reading 16"):
        zip_vit([a, b], [head(1), nn.Linear(8, 2)], [X])
    wide = ViTModel(ViTConfig(hidden_size=D, num_hidden_layers=3, num_attention_heads=HEADS,
                              intermediate_size=FF, image_size=8, patch_size=4),
                    add_pooling_layer=False)  # fmt: skip
    with pytest.raises(MerganserError, match=r"model 1's shape .* differs"):
        zip_vit([a, wide], [head(1), head(2)], [X])
    from transformers import ViTForImageClassification

    with pytest.raises(MerganserError, match=r"model\.vit and model\.classifier"):
        zip_vit([a, ViTForImageClassification(a.config)], [head(1), head(2)], [X])
    pooled = ViTModel(a.config, add_pooling_layer=True)
    with pytest.raises(MerganserError, match="pooler"):
        zip_vit([a, pooled], [head(1), head(2)], [X])
    with pytest.raises(MerganserError, match="no images"):
        zip_vit([a, b], [head(1), head(2)], [], matcher="zipit")


@pytest.mark.parametrize("matcher", ["weight", "permute"])
def test_align_puts_a_permuted_copy_back_in_the_reference_basis(matcher: str) -> None:
    a = vit(1)
    b = permuted(a, 2)
    back = align_vit(a, b, X.split(16), matcher=matcher)
    for name, t in a.state_dict().items():
        assert torch.allclose(back.state_dict()[name], t, atol=1e-6), (matcher, name)
    # and on models from different initialisations: the same function as the other model
    c, hc = vit(3), head(7)
    moved = align_vit(a, c, X.split(16), matcher=matcher)
    with torch.no_grad():
        h = nn.Linear(D, 3)
        h.weight.copy_(hc.weight[:, moved.residual_perm])
        h.bias.copy_(hc.bias)
        assert torch.allclose(logits(moved, h), logits(c, hc), atol=1e-4)


@pytest.mark.parametrize("stop", [1, LAYERS])
def test_bfloat16_vits_zip_and_run_in_their_dtype(stop: int) -> None:
    a, b = vit(1).to(torch.bfloat16), vit(2).to(torch.bfloat16)
    heads = [head(1).to(torch.bfloat16), head(2, 4).to(torch.bfloat16)]
    z = zip_vit([a, b], heads, X.split(16), stop=stop, refit=1e-4)
    with torch.no_grad():
        out = z(X.to(torch.bfloat16), 1)
    assert out.dtype == torch.bfloat16 and out.shape == (48, 4) and torch.isfinite(out).all()
