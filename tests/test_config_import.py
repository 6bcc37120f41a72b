"""`wantrainer config import`: musubi-tuner and Takenoko files (shaped as their documentation writes them)
become one of our configs; every source key is either carried over or listed with the reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from wantrainer.cli import main
from wantrainer.config_parser import load_config

# musubi-tuner docs/dataset_config.md, "Sample for Video Dataset with Caption Text Files" (+ an image dataset
# and a control directory, which has no equivalent here)
MUSUBI_DATASET = """
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
video_directory = "data/video_dir"
cache_directory = "data/cache_directory"
target_frames = [1, 25, 45]
frame_extraction = "head"
source_fps = 30.0

[[datasets]]
video_directory = "data/video_dir2"
cache_directory = "data/cache_directory2"
frame_extraction = "full"
max_frames = 45

[[datasets]]
image_directory = "data/images"
cache_directory = "data/image_cache"
num_repeats = 2
control_directory = "data/control"
"""

# musubi-tuner docs/wan.md, the training command (a text file as users keep it), with sampling options
MUSUBI_COMMAND = """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/wan_train_network.py \\
    --task t2v-1.3B \\
    --dit models/wan2.1_t2v_1.3B_bf16.safetensors \\
    --dataset_config dataset.toml --sdpa --mixed_precision bf16 --fp8_base \\
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --network_module networks.lora_wan --network_dim 32 \\
    --timestep_sampling shift --discrete_flow_shift 3.0 \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir output --output_name name-of-lora \\
    --vae models/wan_2.1_vae.safetensors --t5 models/models_t5_umt5-xxl-enc-bf16.pth \\
    --sample_prompts prompts.txt --sample_every_n_epochs 1 --sample_at_first \\
    --network_args "loraplus_lr_ratio=4" "verbose=True" --preserve_distribution_shape \\
    --metadata_tags "style, ink" --vae_cache_cpu --guidance_scale 1.0
"""

# musubi-tuner docs/sampling_during_training.md, the prompt file
MUSUBI_PROMPTS = """# prompt 1
A cat walks on the grass, realistic style. --w 640 --h 480 --f 25 --d 1 --s 20

A dog runs on the beach, realistic style. --w 960 --h 544 --f 1 --d 2 --s 20 --n low quality --i img.png
"""

# Takenoko configs/examples/wan21_lora.toml (its keys; paths shortened)
TAKENOKO = '''
target_model = "wan21"
dit = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_t2v_14B_fp16.safetensors"
fp8_scaled = true
fp8_base = true
vae = "models/wan_2.1_vae.safetensors"
t5 = "models/models_t5_umt5-xxl-enc-bf16.pth"
max_train_steps = 10000
max_data_loader_n_workers = 2
persistent_data_loader_workers = true
seed = 20250811
gradient_checkpointing = true
gradient_accumulation_steps = 1
mixed_precision = "fp16"
optimizer_type = "adamw8bit"
learning_rate = 2.0e-5
max_grad_norm = 1.0
lr_scheduler = "constant"
lr_warmup_steps = 0
lr_decay_steps = 0
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1.0
network_module = "networks.lora_wan"
network_dim = 32
network_alpha = 32
timestep_sampling = "shift"
discrete_flow_shift = 3.0
sigmoid_scale = 1.0
weighting_scheme = "none"
logit_mean = 0.0
logit_std = 1.0
mode_scale = 1.29
sdpa = true
validate_every_n_steps = 500
validate_on_epoch_end = true
validation_timesteps = "100,300,500,700,900"
use_unique_noise_per_batch = true
output_dir = "output/wan21_lora"
output_name = "wan21_lora"
save_state = true
save_every_n_steps = 500
auto_resume = true
embed_config_in_metadata = true
enhanced_progress_bar = true
log_config = true
logging_dir = "logs/wan21_lora"
log_with = "tensorboard"
logging_level = "INFO"
launch_tensorboard_server = true
tensorboard_host = "127.0.0.1"
tensorboard_port = 6006
tensorboard_auto_reload = true
sample_every_n_steps = 500
sample_at_first = true

[[sample_prompts]]
text = """
Young woman with short blonde hair and grey eyes, tank top, denim shorts, \\
in a cluttered open restaurant on a hill above amazing ocean beach
"""
width = 384
height = 384
frames = 45
seed = 20250801
step = 20
cfg_scale = 6.0

[datasets.latent_cache]
vae_cache_cpu = true
vae_dtype = "float16"
device = "cuda"
skip_existing = false
keep_cache = true

[datasets.text_encoder_cache]
fp8_t5 = true
device = "cuda"
batch_size = 16
skip_existing = false
keep_cache = true

[datasets.general]
caption_extension = ".txt"
enable_bucket = true
bucket_no_upscale = true

[[datasets.train]]
image_directory = "path/to/images"
cache_directory = "path/to/images/cache"
resolution = [512, 512]
batch_size = 1
num_repeats = 1

[[datasets.train]]
video_directory = "path/to/videos"
cache_directory = "path/to/videos/cache"
resolution = [256, 256]
batch_size = 1
num_repeats = 1
frame_extraction = "uniform"
target_frames = [1, 17, 33]
frame_sample = 1

[[datasets.val]]
image_directory = "path/to/val/images"
cache_directory = "path/to/val/images/cache"
resolution = [512, 512]
batch_size = 1
num_repeats = 1
'''


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _dropped(out: str) -> dict[str, str]:
    """{key: line} of the "without an equivalent" list that `config import` prints."""
    lines = [line.strip()[2:] for line in out.splitlines() if line.startswith("  - ")]
    return {line.split("`")[1]: line for line in lines}


def test_musubi_dataset_command_line_and_prompts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "dataset.toml", MUSUBI_DATASET)
    _write(tmp_path / "prompts.txt", MUSUBI_PROMPTS)
    _write(tmp_path / "train.sh", MUSUBI_COMMAND)
    assert main(["config", "import", "train.sh", "--from", "musubi", "-o", "configs/new.toml"]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads((tmp_path / "configs" / "new.toml").read_text(encoding="utf-8"))
    assert data["target_model"] == "wan21" and data["attn_mode"] == "sdpa" and data["fp8_base"] is True
    assert data["dit"] == "../models/wan2.1_t2v_1.3B_bf16.safetensors"  # relative to the new config
    assert data["learning_rate"] == 2e-4 and data["network_dim"] == 32 and data["max_train_epochs"] == 16
    assert data["network_args"] == ["verbose=True"] and data["loraplus_lr_ratio"] == 4  # LoRA+ is our key
    assert data["sample_at_first"] is True
    assert data["metadata_tags"] == ["style", "ink"] and data["output_name"] == "name-of-lora"
    assert data["datasets"]["latent_cache"] == {"vae_cache_cpu": True}
    assert data["datasets"]["general"] == {"resolution": [960, 544], "caption_extension": ".txt", "batch_size": 1,
                                           "enable_bucket": True, "bucket_no_upscale": False}
    train = data["datasets"]["train"]
    assert [t.get("video_directory", t.get("image_directory")) for t in train] == [
        "../data/video_dir", "../data/video_dir2", "../data/images"]
    assert train[0]["source_fps"] == 30.0 and train[1]["max_frames"] == 45 and train[2]["num_repeats"] == 2
    assert data["sample_prompts"] == [
        {"text": "A cat walks on the grass, realistic style.", "width": 640, "height": 480, "frames": 25,
         "seed": 1, "steps": 20},
        {"text": "A dog runs on the beach, realistic style.", "width": 960, "height": 544, "frames": 1, "seed": 2,
         "steps": 20, "negative_prompt": "low quality"}]
    dropped = _dropped(out)
    assert set(dropped) == {"control_directory", "preserve_distribution_shape", "guidance_scale", "--i"}
    assert "always on here" in dropped["preserve_distribution_shape"]
    assert "not trained here" in dropped["control_directory"]
    # the new config loads (the file problems are for `validate`), and names the dropped keys in its header
    cfg = load_config(tmp_path / "configs" / "new.toml")
    assert cfg.model.dit == tmp_path / "models" / "wan2.1_t2v_1.3B_bf16.safetensors"
    assert "#   train.sh: `guidance_scale` = " in (tmp_path / "configs" / "new.toml").read_text()


def test_musubi_config_file_toml_with_sections(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "dataset.toml", MUSUBI_DATASET)
    _write(tmp_path / "args.toml", """
[model]
task = "t2v-A14B"
dit = "models/low.safetensors"
dit_high_noise = "models/high.safetensors"
timestep_boundary = 875
offload_inactive_dit = true
[training]
learning_rate = 1e-4
max_train_steps = 2000
lr_decay_steps = 10
flash3 = true
ddp_timeout = 60
""")
    assert main(["config", "import", "dataset.toml", "args.toml", "--from", "musubi", "-o", "new.toml"]) == 0
    data = tomllib.loads((tmp_path / "new.toml").read_text(encoding="utf-8"))
    assert data["target_model"] == "wan22" and data["dit_high_noise"] == "models/high.safetensors"
    assert data["timestep_boundary"] == 875 and data["attn_mode"] == "flash_attn"
    assert set(_dropped(capsys.readouterr().out)) == {"control_directory", "lr_decay_steps", "ddp_timeout"}
    # an I2V task is refused with the reason; the rest still converts
    _write(tmp_path / "i2v.toml", 'task = "i2v-14B"\nlearning_rate = 1e-4\n')
    assert main(["config", "import", "i2v.toml", "--from", "musubi", "-o", "i2v_new.toml"]) == 0
    assert "only the T2V tasks" in _dropped(capsys.readouterr().out)["task"]
    assert main(["config", "import", "i2v.toml", "--from", "musubi", "-o", "i2v_new.toml"]) == 2  # exists
    assert "--force" in capsys.readouterr().err


def test_takenoko_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = tomllib.loads(TAKENOKO)
    _write(tmp_path / "wan21_lora.toml", TAKENOKO)
    assert main(["config", "import", "wan21_lora.toml", "--from", "takenoko", "-o", "out/new.toml"]) == 0
    dropped = _dropped(capsys.readouterr().out)
    data = tomllib.loads((tmp_path / "out" / "new.toml").read_text(encoding="utf-8"))
    assert set(dropped) == {"dit", "lr_decay_steps", "use_unique_noise_per_batch", "embed_config_in_metadata",
                            "enhanced_progress_bar", "log_config", "launch_tensorboard_server", "tensorboard_host",
                            "tensorboard_port", "tensorboard_auto_reload"}
    assert "download URL" in dropped["dit"]
    # every other top-level key is carried over with its value (sdpa as attn_mode, paths moved to out/)
    for key, value in source.items():
        if key in dropped or key in ("datasets", "sample_prompts", "sdpa"):
            continue
        want = "../" + value if key in ("vae", "t5", "output_dir", "logging_dir") else value
        assert data[key] == want, key
    assert data["attn_mode"] == "sdpa"
    assert data["sample_prompts"][0]["steps"] == 20 and "step" not in data["sample_prompts"][0]
    assert data["datasets"]["latent_cache"] == source["datasets"]["latent_cache"]
    assert data["datasets"]["text_encoder_cache"] == source["datasets"]["text_encoder_cache"]
    assert len(data["datasets"]["train"]) == 2 and data["datasets"]["val"][0]["resolution"] == [512, 512]
    assert data["datasets"]["train"][1]["video_directory"] == "../path/to/videos"
    cfg = load_config(tmp_path / "out" / "new.toml")
    assert cfg.validation.validation_timesteps == [100, 300, 500, 700, 900]


def test_import_user_errors(tmp_path, capsys):
    assert main(["config", "import", str(tmp_path / "missing.toml"), "--from", "takenoko", "-o",
                 str(tmp_path / "n.toml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["config", "import", str(tmp_path / "x.toml"), "-o", str(tmp_path / "n.toml")]) == 2
    assert "--from musubi|takenoko" in capsys.readouterr().err


@pytest.mark.parametrize("words, expected", [
    ("python wan_train_network.py --a 1 --b --c x y --d=3", {"a": "1", "b": True, "c": ["x", "y"], "d": "3"}),
    ("--gradient-checkpointing --seed 5", {"gradient_checkpointing": True, "seed": "5"}),
])
def test_musubi_flag_parsing(words, expected):
    from wantrainer.config.importers.musubi import parse_flags

    assert parse_flags(words) == expected


def test_takenoko_masked_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "masked.toml", 'use_masked_training_with_prior = true\nmasked_prior_preservation_weight = 0.5\n'
           'unmasked_probability = 0.1\nnormalize_masked_area_loss = true\n[[datasets.train]]\nimage_directory = "data/images"\n'
           'mask_path = "data/masks"\n')
    assert main(["config", "import", "masked.toml", "--from", "takenoko", "-o", "out/new.toml"]) == 0
    out = capsys.readouterr().out
    assert "unmasked_probability" in _dropped(out)
    data = tomllib.loads((tmp_path / "out" / "new.toml").read_text(encoding="utf-8"))
    assert data["datasets"]["train"][0]["mask_directory"] == "../data/masks"
    assert data["unmasked_weight"] == 0.1 and data["masked_prior_preservation_weight"] == 0.5
    assert data["normalize_masked_area_loss"] is True
    assert "Takenoko's default" in out


def test_takenoko_tread_routes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "t.toml", 'enable_tread = true\ntread_mode = "full"\n'
           'tread_config_route1 = "selection_ratio=0.5; start_layer_idx=2; end_layer_idx=-2"\n'
           'tread_config_route2 = "selection_ratio=0.25; start_layer_idx=9; end_layer_idx=11"\n')
    assert main(["config", "import", "t.toml", "--from", "takenoko", "-o", "out/new.toml"]) == 0
    dropped = _dropped(capsys.readouterr().out)
    assert set(dropped) == {"tread_config_route2"} and "tread_config_route1 was taken" in dropped["tread_config_route2"]
    data = tomllib.loads((tmp_path / "out" / "new.toml").read_text(encoding="utf-8"))
    assert (data["tread_selection_ratio"], data["tread_start_layer_idx"], data["tread_end_layer_idx"]) == (0.5, 2, -2)
    _write(tmp_path / "off.toml", 'tread_config_route1 = "selection_ratio=0.1; start_layer_idx=2; end_layer_idx=-2"\n')
    assert main(["config", "import", "off.toml", "--from", "takenoko", "-o", "out/off.toml"]) == 0
    assert "enable_tread = false" in _dropped(capsys.readouterr().out)["tread_config_route1"]
    _write(tmp_path / "frames.toml", 'enable_tread = true\ntread_mode = "frame_stride"\n')
    assert main(["config", "import", "frames.toml", "--from", "takenoko", "-o", "out/frames.toml"]) == 0
    assert "frame / row routing" in _dropped(capsys.readouterr().out)["tread_mode"]
