"""The paper's recipe at real scale: the shipped 3B/7B configs carry the recipe's values, and the dry run
plans a 3B/7B run on the CPU from the released architectures' config.json alone (no weights), with local
data or a hub set served through a mocked HTTP layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlcs_fast.config import load_config
from rlcs_fast.families.qwen2_5_vl import RELEASED  # the released config.json files
from rlcs_fast.plan import count_params, load_model_config, model_arch

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = ["sft_3b", "sft_7b", "grpo_3b", "grpo_7b", "sft_qwen3vl_4b", "sft_qwen3vl_8b", "grpo_qwen3vl_4b",
           "grpo_qwen3vl_8b"]


# the released repos' small files the launch preflight reads (values as published)
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
SPECIAL_IDS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
               151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
               151655: "<|image_pad|>", 151656: "<|video_pad|>"}


def released_dir(root: Path, size: str) -> Path:
    """The released model's config, preprocessor and tokenizer config (no weights, no vocabulary)."""
    d = root / f"qwen2_5_vl_{size}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(RELEASED[size]))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": t, "special": True} for i, t in SPECIAL_IDS.items()}}))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}...{% endfor %}"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return d


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_config_loads_and_every_value_says_where_it_comes_from(name):
    path = CONFIGS / f"{name}.toml"
    load_config(path)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if "=" not in s or s.startswith(("#", "[")):
            continue
        key = s.split("=", 1)[0].strip()
        if key in ("dir", "stages", "resume", "progress", "train_split", "val_split"):
            continue  # run plumbing, not recipe values
        prev = lines[i - 1].strip() if i else ""
        assert "#" in s or prev.startswith("#"), f"{name}.toml line {i + 1}: `{s}` has no source comment"


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_recipe_values(size):
    sft, grpo = load_config(CONFIGS / f"sft_{size}.toml"), load_config(CONFIGS / f"grpo_{size}.toml")
    model = f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    assert sft.model.path == model and grpo.model.path == model
    assert sft.run.stages == ["sft"] and grpo.run.stages == ["grpo"]
    assert sft.data.train == "WaltonFuture/Multimodal-Cold-Start"
    assert grpo.data.train == "WaltonFuture/Multimodal-RL-Data"
    assert sft.sft.epochs == 3 and sft.sft.steps == 0 and sft.data.max_pixels == 1204224
    # ms-swift's defaults with --freeze_aligner false: ViT frozen, merger and LLM trained
    assert sft.model.gradient_checkpointing and sft.model.freeze_vision and sft.data.system_prompt
    g = grpo.grpo
    assert (g.n, g.temperature, g.top_p, g.rollout_batch_size, g.mini_batch_size) == (10, 0.7, 0.99, 512, 128)
    assert (grpo.optim.lr, grpo.optim.weight_decay, grpo.optim.grad_clip) == (1e-6, 1e-2, 1.0)
    assert (g.kl_coef, g.kl_type, g.max_prompt_length, g.max_response_length) == (1e-2,
                                                                                  "low_var_kl", 2048, 2048)
    assert (grpo.data.min_pixels, grpo.data.max_pixels) == (262144, 1204224)
    assert (g.val_temperature, g.val_n) == (0.5, 1)
    assert grpo.reward.format_weight == 0 and grpo.reward.function == ""
    assert grpo.rollout.engine == "vllm"
    assert g.loss == "grpo" and g.rollout_correction == "none" and not g.rollout_rejection  # EasyR1 has none
    assert grpo.model.gradient_checkpointing and not grpo.model.freeze_vision
    # the policy sees in RL the prompt it was cold-started on
    assert sft.data.system_prompt == grpo.data.system_prompt
    assert sft.data.prompt_template == grpo.data.prompt_template


@pytest.mark.parametrize("size, expected", [("3b", None), ("7b", 8_292_166_656), ("tiny", None)])
def test_parameter_count_from_config_equals_the_built_model(tmp_path, size, expected):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = load_model_config("tiny" if size == "tiny" else str(released_dir(tmp_path, size)))
    with torch.device("meta"):  # shapes only: a 7B model costs no memory here
        model = Qwen2_5_VLForConditionalGeneration(config)
    text, vision = count_params(config)
    assert text + vision == sum(p.numel() for p in model.parameters())
    assert vision == sum(p.numel() for p in model.model.visual.parameters())
    if expected is not None:
        assert text + vision == expected  # the 8.29B the model card states
    arch = model_arch(config)
    if size == "7b":
        assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.vocab, arch.tied) == (28, 3584, 28,
                                                                                                4,
                                                                                                152064, False)


@pytest.mark.slow
def test_dry_run_plans_a_7b_grpo_run_without_weights(tmp_path):
    from rlcs_fast.synthetic import save_synthetic

    model = released_dir(tmp_path, "7b")
    data = tmp_path / "rl.parquet"
    save_synthetic(data, "rl", "train", 12, seed=0)
    cmd = [sys.executable, "-m", "rlcs_fast.train", "--cfg", str(CONFIGS / "grpo_7b.toml"), "--dry-run",
           "--model.path", str(model), "--data.train", str(data), "--data.val", str(data)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "28 layers, hidden 3584, heads 28 (kv 4, head dim 128), MLP 18944, vocab 152064" in out
    assert "vision: 32 blocks, hidden 1280" in out and "8,292,166,656" in out
    assert "12 rows, columns ['images', 'problem', 'answer']" in out
    for line in ("prompts per step: 512", "responses per step: 5,120", "optimizer updates per step: 4",
                 "micro-batch token budget: 16,384", "steps per epoch: 1"):
        assert line in out, line
    assert "AdamW states (2 x fp32, sharded)" in out and "vLLM KV cache" in out and "plan OK" in out
    assert not (tmp_path / "runs").exists(), "a dry run must not create the run directory"


def qwen3_vl_dir(root: Path, size: str) -> Path:
    from rlcs_fast.families.qwen3_vl import RELEASED as QWEN3_VL

    d = root / f"qwen3_vl_{size}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(QWEN3_VL[size]))
    return d


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_qwen3_vl_recipe_carries_the_paper_values_over(size):
    """Every recipe value of the Qwen2.5-VL configs carries over, except the model and the pixel bounds
    (32-px merged tokens: the same 1536-token cap as the recipe's 1204224 pixels at 28 px)."""
    ref = {"4b": "3b", "8b": "7b"}[size]
    for stage in ("sft", "grpo"):
        new = load_config(CONFIGS / f"{stage}_qwen3vl_{size}.toml")
        old = load_config(CONFIGS / f"{stage}_{ref}.toml")
        assert new.model.path == f"Qwen/Qwen3-VL-{size.upper()}-Instruct"
        assert new.data.max_pixels == 1536 * 32 * 32 and old.data.max_pixels == 1536 * 28 * 28
        for section in ("optim", "sft", "grpo", "reward", "rollout", "checkpoint"):
            assert getattr(new, section) == getattr(old, section), section
        same = {k: v for k, v in vars(new.data).items() if k not in ("min_pixels", "max_pixels")}
        assert same == {k: v for k, v in vars(old.data).items() if k not in ("min_pixels", "max_pixels")}
        assert new.model.freeze_vision == old.model.freeze_vision
        assert new.run.stages == old.run.stages and new.run.seed == old.run.seed
    assert load_config(CONFIGS / f"grpo_qwen3vl_{size}.toml").data.min_pixels == 262144


@pytest.mark.parametrize("size, expected", [("2b", 2_127_532_032), ("4b", 4_437_815_808),
                                            ("8b", 8_767_123_696)])
def test_qwen3_vl_parameter_count_equals_the_built_model(tmp_path, size, expected):
    """The planner's count of the released Qwen3-VL architectures equals transformers' model (meta device)
    and the model cards' 2B / 4.44B / 8.77B."""
    from transformers import Qwen3VLForConditionalGeneration

    config = load_model_config(str(qwen3_vl_dir(tmp_path, size)))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    text, vision = count_params(config)
    assert text + vision == sum(p.numel() for p in model.parameters()) == expected
    assert vision == sum(p.numel() for p in model.model.visual.parameters())
    arch = model_arch(config)
    assert arch.merged_patch_pixels == 32 * 32 and arch.head_dim == 128 and arch.kv_heads == 8


def test_qwen3_vl_8b_recipe_fits_8_gpus_of_80_gb(tmp_path):
    from rlcs_fast.plan import build_plan

    for stage in ("sft", "grpo"):
        cfg = load_config(CONFIGS / f"{stage}_qwen3vl_8b.toml",
                          {"model.path": str(qwen3_vl_dir(tmp_path, "8b")), "data.train": "synthetic",
                           "data.val": "synthetic", "data.synthetic_train_size": 4,
                           "data.synthetic_val_size": 2})
        mem = build_plan(cfg, world=8, gpu_gib=80.0).memory[stage]
        peak = "training peak (state + chosen activations)"
        assert mem[8][peak] < 76 < mem[1][peak], (stage, mem[8][peak], mem[1][peak])


def test_memory_plan_shards_state_over_ranks(tmp_path):
    from rlcs_fast.plan import build_plan

    cfg = load_config(CONFIGS / "grpo_7b.toml", {"model.path": str(released_dir(tmp_path, "7b")),
                                                  "data.train": "synthetic", "data.val": "synthetic",
                                                  "data.synthetic_train_size": 4,
                                                 "data.synthetic_val_size": 2})
    plan = build_plan(cfg, world=8, gpu_gib=80.0)
    mem = plan.memory["grpo"]
    p = 8_292_166_656
    assert mem[8]["AdamW states (2 x fp32, sharded)"] == pytest.approx(8 * p / 8 / 2**30)
    master = "parameters (fp32 master, sharded)"
    assert mem[1][master] == pytest.approx(8 * mem[8][master])
    assert mem[8]["activations, checkpointing"] < mem[8]["activations, no checkpointing"] / 5
    assert mem[8]["vLLM weights (bf16)"] == pytest.approx(2 * p / 2**30)
    # the recipe fits an 8 x 80 GB node at 7B, and does not fit one GPU
    awake, peak = "awake: sharded training state + vLLM pool", "training peak (state + chosen activations)"
    assert mem[8][awake] < 76 < mem[1][peak]


MOCK_HUB = '''
import re, sys
import httpx2, huggingface_hub

PARQ = open({parquet!r}, "rb").read()
REPO, SHA = "WaltonFuture/Multimodal-RL-Data", "0123456789abcdef0123456789abcdef01234567"
README = (b"---\\nconfigs:\\n- config_name: default\\n  data_files:\\n  - split: train\\n"
          b"    path: data/train-*.parquet\\n---\\n")
FILES = {{"README.md": README, "data/train-00000-of-00001.parquet": PARQ}}

def file_response(req, body):
    headers = {{"x-repo-commit": SHA, "etag": '"e%d"' % len(body), "accept-ranges": "bytes"}}
    m = re.match(r"bytes=(\\d+)-(\\d*)", req.headers.get("range", ""))
    status = 200
    if m:
        a = int(m[1]); b = int(m[2]) if m[2] else len(body) - 1
        headers["content-range"] = f"bytes {{a}}-{{min(b, len(body) - 1)}}/{{len(body)}}"
        body, status = body[a:b + 1], 206
    headers["content-length"] = str(len(body))
    return httpx2.Response(status, headers=headers, content=b"" if req.method == "HEAD" else body)

def handler(req):
    path = req.url.path
    if req.url.host != "huggingface.co":  # datasets-server, S3: not part of this hub
        return httpx2.Response(404, json={{"error": "not found"}})
    if "{unreachable}" in path:  # a set this hub does not serve (a refused connection is retried ~24 s)
        return httpx2.Response(404, headers={{"x-error-code": "RepoNotFound"}},
                               json={{"error": "Repository not found"}})
    m = re.match(rf"/datasets/{{REPO}}/resolve/[^/]+/(.+)", path)
    if m and m[1] in FILES:
        return file_response(req, FILES[m[1]])
    if re.fullmatch(rf"/api/datasets/{{REPO}}(/revision/[^/]+)?", path):
        siblings = [{{"rfilename": f}} for f in FILES]
        return httpx2.Response(200, json={{"id": REPO, "sha": SHA, "siblings": siblings}})
    m = re.fullmatch(rf"/api/datasets/{{REPO}}/tree/[^/]+/?(.*)", path)
    if m is not None:
        prefix = m[1]
        if prefix == "data":
            return httpx2.Response(200, json=[{{"type": "file", "path": "data/train-00000-of-00001.parquet",
                                               "size": len(PARQ), "oid": "1" * 40}}])
        return httpx2.Response(200, json=[
            {{"type": "file", "path": "README.md", "size": len(README), "oid": "2" * 40}},
            {{"type": "directory", "path": "data", "oid": "3" * 40}}])
    return httpx2.Response(404, json={{"error": "not found"}})

huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
from rlcs_fast.train import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_dry_run_reads_a_hub_set_through_http_and_names_the_key_it_cannot_reach(tmp_path):
    from rlcs_fast.synthetic import save_synthetic

    parquet = tmp_path / "served.parquet"
    save_synthetic(parquet, "rl", "train", 5, seed=1)
    script = tmp_path / "mocked_hub_train.py"
    script.write_text(textwrap.dedent(MOCK_HUB.format(parquet=str(parquet), unreachable="Unreachable-Set")))
    env = _env() | {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, str(script), "--cfg", str(CONFIGS / "grpo_3b.toml"), "--dry-run",
           "--model.path", str(released_dir(tmp_path, "3b")), "--data.val", "someone/Unreachable-Set"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr  # the plan reports an error: the val set cannot be loaded
    assert "data.train = 'WaltonFuture/Multimodal-RL-Data' split 'train'" in out
    assert "columns ['images', 'problem', 'answer']" in out
    assert "ERROR config key `data.val` = 'someone/Unreachable-Set'" in out and "unreachable" in out
    assert "36 layers, hidden 2048, heads 16 (kv 2" in out and "embeddings tied" in out


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_dry_run_with_an_unreachable_hub_fails_fast_naming_the_keys(tmp_path, hub):
    """HF_HUB_OFFLINE honoured; a hub that refuses connections costs one short probe, not the hub
    library's retries with back-off (about 110 s for a model id and two sets before the fix)."""
    import time

    env = _env() | {"HF_HOME": str(tmp_path / "hf_home")}
    if hub == "offline":
        env |= {"HF_HUB_OFFLINE": "1"}
    else:  # nothing listens on port 9 (discard) of the loopback: every connection is refused
        env |= {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "rlcs_fast.train", "--cfg", str(CONFIGS / "grpo_3b.toml"), "--dry-run",
           "--model.path", "Qwen/Qwen2.5-VL-3B-Instruct", "--data.train", "someone/Some-Set",
           "--data.val", "someone/Other-Set"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    for key in ("model.path", "data.train", "data.val"):
        assert f"config key `{key}`" in out and "unreachable" in out, (key, out)
    assert elapsed < 25, f"the dry run took {elapsed:.0f} s to report an unreachable hub"


def test_freeze_vision_freezes_the_vit_blocks_not_the_merger():
    from rlcs_fast.model import load_model
    from rlcs_fast.tiny import tiny_path

    model, _ = load_model(str(tiny_path()), freeze_vision=True)
    visual = dict(model.model.visual.named_parameters())
    assert visual and all(p.requires_grad == name.startswith("merger.") for name, p in visual.items())
    assert any(name.startswith("merger.") for name in visual) and any(name.startswith("blocks.")
                                                                      for name in visual)
    assert all(p.requires_grad for p in model.model.language_model.parameters())
