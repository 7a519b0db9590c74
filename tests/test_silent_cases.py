"""The silent cases of issue 26, each of which exited 0 with a wrong or broken model: now each
gives the right result or one line saying why not.
"""

from __future__ import annotations

import json
import re

import torch
from conftest import load_folder, write_model, write_recipe
from safetensors.torch import save_file

from merganser.cli import main


def _merge(capsys, recipe, out, *flags) -> tuple[int, str]:
    rc = main(["merge", str(recipe), str(out), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def _merge_linear(capsys, tmp_path, models, name="r", **extra) -> tuple[int, str]:
    """A linear recipe over ``models`` (folders), merged into tmp_path/o_<name>."""
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in models], **extra}
    return _merge(capsys, write_recipe(tmp_path / f"{name}.yaml", recipe), tmp_path / f"o_{name}")


def _layers(tmp_path, n=3, names=("model.layers.0.mlp.up_proj.weight",), config=None):
    g = torch.Generator().manual_seed(0)
    return [
        write_model(
            tmp_path / f"m{i}",
            {k: torch.randn(8, 4, generator=g) for k in names},
            config if config is not None else {"num_hidden_layers": 1},
        )
        for i in range(n)
    ]


def test_lora_adapter_folder_is_never_merged_as_plain_tensors(tmp_path, capsys) -> None:
    """lora_A and lora_B were averaged separately: a layer's ΔW came out 77 % off."""
    adapters = []
    for i in range(2):
        d = tmp_path / f"adapter{i}"
        d.mkdir()
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file(
            {
                f"{prefix}.lora_A.weight": torch.randn(2, 8),
                f"{prefix}.lora_B.weight": torch.randn(8, 2),
            },
            str(d / "adapter_model.safetensors"),
        )
        (d / "adapter_config.json").write_text(
            json.dumps({"r": 2, "lora_alpha": 4, "peft_type": "LORA"})
        )
        adapters.append(d)
    rc, err = _merge_linear(capsys, tmp_path, adapters)
    assert rc == 1 and err.count("\n") == 1 and "is a PEFT LoRA adapter" in err
    assert not (tmp_path / "o_r").exists()


def _fp8_model(folder, seed, block=(4, 8)):
    """A block-scaled FP8 checkpoint (DeepSeek-V3's layout) and its dequantised float32 copy."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 20, generator=g)  # partial blocks at the edges
    rows, cols = -(-10 // block[0]), -(-20 // block[1])
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = part.abs().max() / 448
    full = scale.repeat_interleave(block[0], 0)[:10].repeat_interleave(block[1], 1)[:, :20]
    q = (w / full).to(torch.float8_e4m3fn)
    embed = torch.randn(6, 20, generator=g).to(torch.bfloat16)
    quant = {"quant_method": "fp8", "weight_block_size": list(block), "fmt": "e4m3"}
    write_model(
        folder,
        {
            "model.embed_tokens.weight": embed,
            "model.layers.0.mlp.up_proj.weight": q,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
        },
        {"num_hidden_layers": 1, "quantization_config": quant},
    )
    plain = write_model(
        folder.with_name(folder.name + "-f32"),
        {"model.embed_tokens.weight": embed, "model.layers.0.mlp.up_proj.weight": q.float() * full},
        {"num_hidden_layers": 1},
    )
    return folder, plain


def test_fp8_block_scaled_checkpoints_are_dequantised_on_read(tmp_path, capsys) -> None:
    """FP8 weights with block scales were merged as raw F8_E4M3 values, not dequantised: now
    the merge equals merging the dequantised float32 copies, and the output is plain floats.
    """
    (a, a32), (b, b32) = _fp8_model(tmp_path / "a", 0), _fp8_model(tmp_path / "b", 1)
    for pair, out in (((a, b), "o"), ((a32, b32), "o32")):
        r = write_recipe(
            tmp_path / f"{out}.yaml",
            {
                "merge_method": "ties",
                "base_model": str(pair[0]),
                "models": [{"model": str(pair[1])}],
                "parameters": {"density": 0.5},
                "out_dtype": "float32",
            },
        )
        rc, err = _merge(capsys, r, tmp_path / out)
        assert rc == 0, err
    got, want = load_folder(tmp_path / "o"), load_folder(tmp_path / "o32")
    assert (
        set(got) == set(want) == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in config
    # Without out_dtype the dequantised weights are written as bfloat16, never as raw FP8.
    assert _merge_linear(capsys, tmp_path, [a], "d")[0] == 0
    one = load_folder(tmp_path / "o_d")["model.layers.0.mlp.up_proj.weight"]
    assert one.dtype == torch.bfloat16
    assert torch.equal(
        one, load_folder(a32)["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    )


def test_fp8_without_scales_static_fp8_and_gptq_checkpoints_are_refused(tmp_path, capsys):
    fp8 = torch.randn(8, 8).to(torch.float8_e4m3fn)
    cases = [
        ("bare", {"w": fp8}, {}, "FP8 without block scales"),
        (
            "per-tensor",
            {"w": fp8, "w_scale": torch.ones(())},
            {"quant_method": "fbgemm_fp8"},
            "quantization_config: fbgemm_fp8",
        ),
        (
            "static",
            {"w": fp8, "w_scale_inv": torch.ones(1, 1), "input_scale": torch.ones(())},
            {"quant_method": "fp8", "weight_block_size": [8, 8], "activation_scheme": "static"},
            "'static' activation scales",
        ),
        (
            "gptq",
            {"qweight": torch.zeros(4, 8, dtype=torch.int32)},
            {"quant_method": "gptq", "bits": 4},
            "quantization_config: gptq",
        ),
    ]
    for name, tensors, quant, message in cases:
        config = {"num_hidden_layers": 1, **({"quantization_config": quant} if quant else {})}
        tensors = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in tensors.items()}
        m = write_model(tmp_path / name, tensors, config)
        rc, err = _merge_linear(capsys, tmp_path, [m], name)
        assert rc == 1 and err.count("\n") == 1 and message in err, (name, err)


def test_dppa_without_layer_linears_is_refused_not_task_arithmetic(tmp_path, capsys) -> None:
    """Names outside the layer pattern (body.0.weight) made DPPA bit-identical to TA."""
    ms = _layers(tmp_path, names=("body.0.weight", "body.1.weight"), config={})
    recipe = {
        "merge_method": "dppa",
        "base_model": str(ms[0]),
        "models": [{"model": str(m)} for m in ms[1:]],
    }
    rc, err = _merge(capsys, write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "o")
    assert rc == 1 and "dppa: no tensor is a linear weight inside a layer stack" in err


def test_regmean_refuses_a_layer_linear_without_its_gram(tmp_path, capsys) -> None:
    """A missing or misnamed gram.<name> made RegMean average that weight without a word."""
    names = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight")
    ms = _layers(tmp_path, n=2, names=names)
    stats = []
    for i in range(len(ms)):
        p = tmp_path / f"s{i}.safetensors"
        grams = {"gram.model.layers.0.mlp.up_proj.weight": torch.eye(4)}
        if i == 0:  # the second model's file lacks down_proj's Gram
            grams["gram.model.layers.0.mlp.down_proj.weight"] = torch.eye(4)
        save_file(grams, str(p), metadata={"format": "merganser-statistics-1", "kinds": "gram"})
        stats.append(p)
    recipe = {
        "merge_method": "regmean",
        "models": [{"model": str(m), "statistics": str(s)} for m, s in zip(ms, stats, strict=True)],
    }
    rc, err = _merge(capsys, write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "o")
    assert rc == 1 and "'gram.model.layers.0.mlp.down_proj.weight' missing" in err


def test_filter_matching_nothing_and_ignored_parameters_warn_or_fail_with_strict(tmp_path, capsys):
    ms = _layers(tmp_path)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(ms[0]),
        "models": [{"model": str(m)} for m in ms[1:]],
        "parameters": {
            "weight": [{"filter": "self_atn", "value": 0.3}, {"value": 0.5}],
            "density": 0.5,
        },
    }
    r = write_recipe(tmp_path / "r.yaml", recipe)
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 0
    warnings = err.splitlines()
    assert any("parameters.weight[0].filter: 'self_atn' matches no tensor" in w for w in warnings)
    assert any(
        "parameters.density: has no effect on method 'task_arithmetic'" in w for w in warnings
    )
    assert all(w.startswith("merganser: warning: ") for w in warnings)
    rc, err = _merge(capsys, r, tmp_path / "o2", "--strict")
    assert rc == 1 and err.count("\n") == 1 and "(--strict)" in err
    assert not (tmp_path / "o2").exists()


def _sentence_transformer(folder, seed):
    g = torch.Generator().manual_seed(seed)
    write_model(
        folder,
        {
            f"encoder.layer.{i}.attention.self.query.weight": torch.randn(4, 4, generator=g)
            for i in range(2)
        },
        {"model_type": "bert", "num_hidden_layers": 2},
    )
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def test_sidecar_files_are_carried_and_the_card_names_every_input_by_name(tmp_path, capsys) -> None:
    """sentence-transformers folders lost modules.json and 1_Pooling/ (the merged model no
    longer pooled as the original); the card held absolute paths and listed the base alone.
    """
    a = _sentence_transformer(tmp_path / "minilm-a", 0)
    b = _sentence_transformer(tmp_path / "minilm-b", 1)
    (a / "preprocessor_config.json").write_text("{}")
    r = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "task_arithmetic", "base_model": str(a), "models": [{"model": str(b)}]},
    )
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 0, err
    out = tmp_path / "o"
    for f in (
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "preprocessor_config.json",
    ):
        assert (out / f).read_bytes() == (a / f).read_bytes(), f
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card
    front = card.split("---")[1]
    assert re.search(r'base_model:\n- "minilm-a"\n- "minilm-b"\n', front), front
    assert "library_name: transformers" in front
    assert main(["verify", str(out)]) == 0
    # A module that holds weights would be copied unmerged: refused.
    (b / "2_Dense").mkdir()
    save_file({"linear.weight": torch.ones(2, 2)}, str(b / "2_Dense" / "model.safetensors"))
    mods = json.loads((b / "modules.json").read_text())
    (b / "modules.json").write_text(json.dumps([*mods, {"idx": 2, "name": "2", "path": "2_Dense"}]))
    rc, err = _merge_linear(capsys, tmp_path, [b, a], "r2")
    assert rc == 1 and "module 2_Dense holds weights" in err


def test_output_whose_config_disagrees_with_its_tensors_is_refused(tmp_path, capsys) -> None:
    """The check before any work: a config that says 4 layers over tensors of 2 is refused."""
    ms = _layers(
        tmp_path,
        n=2,
        names=[f"model.layers.{i}.w" for i in range(2)],
        config={"num_hidden_layers": 4},
    )
    r = write_recipe(
        tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]}
    )
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 1 and "config num_hidden_layers is 4 but the tensors hold 2 layers" in err
    # With the right count the same merge is fine, and one model in gives that model out.
    for m in ms:
        (m / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 0, err
    a, b = load_folder(ms[0]), load_folder(ms[1])
    out = load_folder(tmp_path / "o")
    assert all(torch.allclose(out[k], (a[k] + b[k]) / 2) for k in a)


def test_chat_template_is_never_ignored(tmp_path, capsys) -> None:
    """chat_template was parsed and never used: the output kept the base's template. It is
    now applied (tests/test_chat_template.py), and refused where there is no tokenizer.
    """
    rc, err = _merge_linear(capsys, tmp_path, _layers(tmp_path, n=2), chat_template="chatml")
    assert rc == 1 and "chat_template: the output has no tokenizer to carry it" in err


def test_residual_weight_warns_that_it_does_nothing(tmp_path, capsys) -> None:
    """slices[].residual_weight was accepted and ignored without a word (mergekit ignores it
    too, so it warns rather than fails; --strict makes it an error).
    """
    ms = _layers(tmp_path, n=2)
    src = [{"model": str(m), "layer_range": [0, 1]} for m in ms]
    recipe = {
        "merge_method": "linear",
        "slices": [{"sources": src, "residual_weight": 0.3}],
    }
    r = write_recipe(tmp_path / "r.yaml", recipe)
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 0, err
    assert "merganser: warning: " in err and "slices[0].residual_weight: has no effect" in err
    rc, err = _merge(capsys, r, tmp_path / "o2", "--strict")
    assert rc == 1 and "residual_weight" in err and not (tmp_path / "o2").exists()


def test_a_module_folder_leading_outside_the_model_is_refused(tmp_path, capsys) -> None:
    """modules.json is the model's own file: a module path that links elsewhere copies nothing."""
    a = _sentence_transformer(tmp_path / "a", 0)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("private")
    (a / "1_Pooling" / "config.json").unlink()
    (a / "1_Pooling").rmdir()
    (a / "1_Pooling").symlink_to(secret)
    rc, err = _merge_linear(capsys, tmp_path, [a])
    assert rc == 1 and "leads outside the model folder" in err and not (tmp_path / "o_r").exists()


def test_modules_without_any_model_are_refused(tmp_path, capsys) -> None:
    r = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "modules": {"text_decoder": {"slices": [{"sources": []}]}}},
    )
    rc, err = _merge(capsys, r, tmp_path / "o")
    assert rc == 1 and err.count("\n") == 1 and "modules: no model is named" in err


def test_frankenmerge_whose_shapes_its_config_cannot_hold_is_refused(tmp_path, capsys) -> None:
    """Layers of a wider model stacked on a narrower one's config exited 0 with an output
    transformers cannot load; the meta-device check refuses it before any work.
    """
    import transformers as T

    for name, inter in (("a", 64), ("b", 96)):
        cfg = T.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=inter, num_attention_heads=4,
            num_hidden_layers=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        cfg.architectures = ["LlamaForCausalLM"]
        T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
    capsys.readouterr()  # save_pretrained's progress bars
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tmp_path / "b"), "layer_range": [2, 4]}]},
        ],
    }
    rc, err = _merge(capsys, write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out")
    assert rc == 1 and err.count("\n") == 1, err
    assert "LlamaForCausalLM would not load the output" in err
    assert "shape model.layers.2.mlp.down_proj.weight (32, 96)" in err
    assert not (tmp_path / "out").exists()


def test_meta_check_reports_only_what_the_merge_introduced(tmp_path) -> None:
    """A checkpoint transformers loads with warnings (an extra buffer) still merges; a tensor
    the merge drops is named as missing.
    """
    from merganser.model import hf

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "num_key_value_heads": 2, "tie_word_embeddings": False,
    }  # fmt: skip
    import transformers as T

    with torch.device("meta"):
        want = T.LlamaForCausalLM(T.LlamaConfig(**cfg)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in want.items()}
    assert hf.key_problems(shapes, cfg) == set()
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert hf.key_problems({**shapes, buffer: (4,)}, cfg) == {f"unexpected:{buffer}"}
    del shapes["lm_head.weight"]
    assert hf.key_problems(shapes, cfg) == {"missing:lm_head.weight"}
    assert hf.key_problems(shapes, {**cfg, "auto_map": {"AutoModel": "x.Y"}}) is None
    assert hf.key_problems(shapes, {**cfg, "architectures": ["NoSuchModel"]}) is None


def test_calibrating_a_model_that_is_not_a_causal_lm(tmp_path, capsys) -> None:
    """A BERT folder with a text file died inside calibrate with an internal error
    (RuntimeError: Could not infer dtype of NoneType). Any transformers class now calibrates;
    a tokenizer without a padding token batches one text at a time."""
    import transformers as T
    from conftest import write_tokenizer
    from safetensors import safe_open

    cfg = T.BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)  # fmt: skip
    cfg.architectures = ["BertForMaskedLM"]
    T.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    write_tokenizer(tmp_path / "bert", ["[UNK]", "a", "b"])
    (tmp_path / "data.txt").write_text("a b a\nb a b a\n")
    capsys.readouterr()
    rc = main(["calibrate", str(tmp_path / "bert"), str(tmp_path / "s.safetensors"),
               "--data", str(tmp_path / "data.txt"), "--fisher"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "2 examples (7 tokens)" in out
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "gram.bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "fisher.bert.embeddings.word_embeddings.weight" in keys


def test_dppa_eight_experts_fit_the_budget_its_work_needs(tmp_path) -> None:
    """DPPA refused 8 experts of a 1B model ("needs about 12.7 GiB ... more than
    --memory-budget"): its estimate counted four working copies per input, but it sparsifies
    one model at a time. A budget between the old and the true need now merges."""
    from conftest import random_models

    import merganser

    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (256, 128) for i in range(2)}
    paths = random_models(tmp_path, shapes, 9, seed=0)
    recipe = {
        "merge_method": "dppa",
        "base_model": str(paths[0]),
        "models": [{"model": str(p)} for p in paths[1:]],
    }
    numel = 256 * 128
    budget = 150 * numel  # the old estimate: 4 · (9 + 2 + 4 · 9) = 188 bytes per entry
    merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(memory_budget=budget))
    assert (tmp_path / "out" / "model.safetensors").is_file()
