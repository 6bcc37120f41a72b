"""`validate` checks what the commands check: for each mistake, validate exits 2 with the very message that
train (or caching) stops with; caching exits 2 when a dataset is left without items; a failed start leaves no
TensorBoard file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from train_support import load, write_config
from wantrainer.cli import main
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.devkit.synthetic import write_mp4
from wantrainer.errors import UserError


def _clips(folder, lengths):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        write_mp4(folder / f"clip{i}.mp4", [np.full((32, 32, 3), 10 * j, np.uint8) for j in range(n)])
        (folder / f"clip{i}.txt").write_text("a clip")
    return folder


MISTAKES = {
    "network_module": (dict(network_module="networks.nope"), "network_module = 'networks.nope' is not available"),
    "optimizer_type": (dict(optimizer_type="adamw8bitt"), "optimizer_type = 'adamw8bitt' is unknown"),
    "optimizer_args": (dict(optimizer_args=["weight_decay=lots"]), "optimizer_args: weight_decay = 'lots' is not a"),
    "network_args": (dict(network_args=["include_patterns=blocks"]), "network_args: include_patterns must be a "
                                                                     "list of regex strings"),
    "wan22_one_expert": ("wan22", "reaches above timestep_boundary (500): set `dit_high_noise`"),
    "clips_too_short": ("short", "3 clip(s), the longest 19 frames; target_frames [33, 49] needs at least 33"),
}


def _values(ws, tmp_path, case):
    change, _ = MISTAKES[case]
    values = ws.config(tmp_path / "out", log_with="tensorboard")
    if change == "wan22":
        values.update(target_model="wan22", dit=str(ws.kit.dit_wan22_low), timestep_boundary=500)
    elif change == "short":
        videos = _clips(tmp_path / "videos", [9, 13, 19])
        values["datasets"]["train"] = [{"video_directory": str(videos), "cache_directory": str(tmp_path / "vc"),
                                        "resolution": [32, 32], "target_frames": [33, 49]}]
    else:
        values.update(change)
    return values


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_validate_refuses_what_train_refuses_with_the_same_message(train_workspace, tmp_path, capsys, case):
    config = write_config(tmp_path / "c.toml", _values(train_workspace, tmp_path, case))
    expected = MISTAKES[case][1]
    assert main(["validate", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    said = (captured.out + captured.err).replace("\n      ", "\n")
    assert expected in said, said  # in the config's own problems, or under "train: not ready"
    with pytest.raises(UserError) as info:
        build_trainer(load(config)).train()
    assert expected in str(info.value)
    assert not (tmp_path / "out" / "logs").exists()  # a failed start leaves no (empty) TensorBoard file


def test_a_valid_config_is_ok_for_train(train_workspace, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", train_workspace.config(tmp_path / "out"))
    assert main(["validate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("config OK for train")


def _cache_config(tmp_path, kit, folder):
    return write_config(tmp_path / "c.toml", {
        "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "datasets": {"train": [{"image_directory": str(folder), "cache_directory": str(tmp_path / "cache"),
                                "resolution": [32, 32]}]}})


def test_cache_latents_exits_2_when_a_dataset_has_no_usable_item(tmp_path, tiny_kit, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    (images / "b.png").write_bytes(b"nor this")
    assert main(["cache-latents", "--config", str(_cache_config(tmp_path, tiny_kit, images))]) == 2
    err = capsys.readouterr().err
    assert "1 dataset(s) have no usable item" in err and "a.png" in err and "Traceback" not in err


def test_cache_latents_exits_0_when_some_items_fail_but_every_dataset_has_items(tmp_path, tiny_kit, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32), (9, 99, 199)).save(images / "good.png")
    assert main(["cache-latents", "--config", str(_cache_config(tmp_path, tiny_kit, images))]) == 0
    captured = capsys.readouterr()
    assert "a.png" in captured.out + captured.err
    assert main(["cache-text", "--config", str(_cache_config(tmp_path, tiny_kit, images))]) == 0
