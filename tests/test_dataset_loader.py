"""The cached-item loader: bucketed batches, seeded order, resume, DDP shards, workers, missing caches."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.cache_format import latent_cache_name, save_latent_cache, save_text_cache
from wantrainer.dataset.loader import build_dataloader
from wantrainer.dataset.sources import scan_dataset
from wantrainer.devkit.synthetic import make_synthetic_dataset, write_mp4
from wantrainer.errors import UserError

TEXT_DIM = 8


def _write_caches(spec, text: bool = True) -> None:
    """Cache files in the real format; latents hold the item's number so batches can be checked."""
    for number, item in enumerate(scan_dataset(spec).items):
        frames = item.frames or 1
        shape = (16, (frames - 1) // 4 + 1, item.bucket[1] // 8, item.bucket[0] // 8)
        save_latent_cache(item.latent_cache_path, torch.full(shape, float(number), dtype=torch.bfloat16),
                          *item.bucket, frame_count=item.frames)
        if text and not item.text_cache_path.exists():
            length = 3 + len(item.caption.split())
            save_text_cache(item.text_cache_path, torch.randn(length, TEXT_DIM).to(torch.bfloat16))


def _specs(root: Path, split: str = "train", batch_size: int = 2, **overrides):
    datasets = {
        "general": {"resolution": 64, "enable_bucket": True, "batch_size": batch_size},
        split: [{"image_directory": "images", "cache_directory": "cache_i", **overrides},
                {"video_directory": "videos", "cache_directory": "cache_v", "target_frames": [9, 17]}],
    }
    return resolve_datasets(parse_config({"datasets": datasets}, config_dir=root).datasets, split)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    make_synthetic_dataset(root, seed=1, num_images=7, num_videos=3, video_frames=(17, 25))
    for spec in _specs(root):
        _write_caches(spec)
    return root


def _keys(loader, epochs=1) -> list[tuple[str, ...]]:
    out = []
    for _ in range(epochs):
        out.extend(tuple(batch["keys"]) for batch in loader)
    return out


def test_batches_never_mix_buckets_and_hold_the_cached_data(cached):
    specs = _specs(cached)
    loader = build_dataloader(specs, seed=0, shuffle=True)
    media = {i.key: i for s in specs for i in scan_dataset(s).items}
    seen = []
    for batch in loader:
        latents = batch["latents"]
        assert latents.dtype == torch.float32 and latents.shape[:2] == (len(batch["keys"]), 16)
        assert len({(media[k].bucket, media[k].frames) for k in batch["keys"]}) == 1
        assert all(t.dtype == torch.float32 and t.shape[1] == TEXT_DIM and t.shape[0] > 3 for t in batch["text_embeds"])
        assert torch.equal(batch["loss_weight"], torch.ones(len(batch["keys"])))
        assert 1 <= len(batch["keys"]) <= 2
        seen.extend(batch["keys"])
    assert sorted(seen) == sorted(media) and len(loader) == len(_keys(loader))
    image_keys = [k for k in media if k.startswith("image_")]
    assert len(image_keys) == 7 and len(media) == 13  # 7 images + 3 clips x 2 windows


def test_order_is_deterministic_per_seed_and_epoch(cached):
    specs = _specs(cached)
    first = _keys(build_dataloader(specs, seed=5, shuffle=True), epochs=2)
    again = _keys(build_dataloader(specs, seed=5, shuffle=True), epochs=2)
    other = _keys(build_dataloader(specs, seed=6, shuffle=True), epochs=2)
    half = len(first) // 2
    assert first == again and first != other and first[:half] != first[half:]
    val = build_dataloader(_specs(cached, "val"), seed=5, shuffle=False)
    assert _keys(val) == _keys(val) == _keys(build_dataloader(_specs(cached, "val"), seed=9, shuffle=False))


def test_num_repeats_and_reg_loss_weight(cached):
    specs = _specs(cached, num_repeats=3, is_reg=True)
    loader = build_dataloader(specs, seed=0, shuffle=True, prior_loss_weight=0.25)
    counts: dict[str, int] = {}
    for batch in loader:
        weight = 0.25 if batch["keys"][0].startswith("image_") else 1.0
        assert torch.equal(batch["loss_weight"], torch.full((len(batch["keys"]),), weight))
        for key in batch["keys"]:
            counts[key] = counts.get(key, 0) + 1
    assert {k: v for k, v in counts.items() if k.startswith("image_")} == {f"image_{i:03d}": 3 for i in range(7)}
    assert {v for k, v in counts.items() if k.startswith("clip_")} == {1}


def _trace(batches) -> list[tuple]:
    return [(tuple(b["keys"]), tuple(t.shape[0] for t in b["text_embeds"]), b["latents"].sum().item()) for b in batches]


def test_mid_epoch_resume_gives_the_same_remaining_batches(cached):
    specs = _specs(cached, caption_dropout_rate=0.5)
    straight = build_dataloader(specs, seed=3, shuffle=True)
    _trace(straight)  # epoch 0
    straight.set_epoch(1)
    it = iter(straight)
    head = _trace(next(it) for _ in range(3))
    state = straight.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    rest = _trace(it)
    straight.set_epoch(2)
    rest += _trace(straight)

    resumed = build_dataloader(specs, seed=3, shuffle=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's own epoch loop: same epoch keeps the position
    replay = _trace(resumed)
    resumed.set_epoch(2)
    replay += _trace(resumed)
    assert replay == rest and len(head) + len(rest) == 2 * len(straight)
    dropped = sum(n == 0 for batch in head + rest for n in batch[1])
    assert 0 < dropped < sum(len(batch[1]) for batch in head + rest)  # dropout 0.5 on the images only


def test_caption_dropout_only_at_train_time(cached):
    loader = build_dataloader(_specs(cached, caption_dropout_rate=1.0), seed=0, shuffle=True)
    for batch in loader:
        dropped = batch["keys"][0].startswith("image_")
        assert all((t.shape == (0, TEXT_DIM)) == dropped for t in batch["text_embeds"])
    val = build_dataloader(_specs(cached, "val", caption_dropout_rate=1.0), seed=0, shuffle=False)
    assert all(t.shape[0] > 0 for batch in val for t in batch["text_embeds"])


@pytest.mark.parametrize(("world_size", "batch_size", "shuffle"), [(2, 1, True), (2, 2, True), (3, 1, True),
                                                                (2, 2, False)])
def test_ddp_ranks_split_the_single_process_batches(cached, world_size, batch_size, shuffle):
    """N ranks x B see, in order, the batches of 1 process x N*B: rank r holds the slice [r*B:(r+1)*B]."""
    split = "train" if shuffle else "val"
    dropout = 0.5 if shuffle else 0.0
    single = _trace(build_dataloader(_specs(cached, split, batch_size * world_size, caption_dropout_rate=dropout),
                                     seed=4, shuffle=shuffle))
    specs = _specs(cached, split, batch_size, caption_dropout_rate=dropout)
    ranks = [build_dataloader(specs, seed=4, shuffle=shuffle, rank=r, world_size=world_size)
             for r in range(world_size)]
    shares = [_trace(loader) for loader in ranks]
    assert len({len(loader) for loader in ranks}) == 1 and all(len(s) == len(ranks[0]) for s in shares)
    kept = [batch for batch in single if len(batch[0]) % world_size == 0]
    assert len(kept) == len(ranks[0]) and len(kept) < len(single)  # some short last batches do not split
    for whole, parts in zip(kept, zip(*shares)):
        size = len(whole[0]) // world_size
        assert all(len(part[0]) == size for part in parts)  # full global batches and evenly split short ones
        assert sum((part[0] for part in parts), ()) == whole[0]
        assert sum((part[1] for part in parts), ()) == whole[1]  # the same caption dropout
        assert sum(part[2] for part in parts) == whole[2]  # the cached latents
    keys = [key for share in shares for batch in share for key in batch[0]]
    assert len(keys) == len(set(keys))  # disjoint (no item repeats in these datasets)
    left_out = sum(len(batch[0]) for batch in single if len(batch[0]) % world_size)
    assert ranks[0].left_out == left_out > 0
    if batch_size == 2:
        assert any(len(batch[0]) == 2 for batch in kept)  # a short last batch of 2 split over 2 ranks


@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 2), (3, 2), (4, 1)])
def test_split_uneven_keeps_every_val_item(cached, world_size, batch_size):
    """The val loader under DDP: the ranks' shares of each global batch add up to the single-process batch,
    short batches split unevenly (fewer items or none on the last ranks), nothing left out."""
    single = list(build_dataloader(_specs(cached, "val", batch_size * world_size), seed=0, shuffle=False))
    ranks = [list(build_dataloader(_specs(cached, "val", batch_size), seed=0, shuffle=False, rank=r,
                                   world_size=world_size, split_uneven=True, num_workers=r % 2))
             for r in range(world_size)]
    by_index: dict[int, list[dict]] = {}
    for share in ranks:
        for batch in share:
            by_index.setdefault(batch["batch_index"], []).append(batch)
    assert sorted(by_index) == list(range(len(single)))
    uneven = 0
    for index, whole in enumerate(single):
        parts = sorted(by_index[index], key=lambda b: b["share_offset"])
        assert [b["global_batch_size"] for b in parts] == [len(whole["keys"])] * len(parts)
        assert sum((b["keys"] for b in parts), []) == whole["keys"]
        assert [b["share_offset"] for b in parts] == [sum(len(p["keys"]) for p in parts[:i]) for i in range(len(parts))]
        torch.testing.assert_close(torch.cat([b["latents"] for b in parts]), whole["latents"], rtol=0, atol=0)
        uneven += len(whole["keys"]) % world_size != 0
    assert uneven > 0  # the case under test occurs
    if world_size == 4:
        assert len({len(share) for share in ranks}) > 1  # a rank with no item of some batch skips it


def test_ddp_resume_and_workers_on_a_rank(cached):
    specs = _specs(cached, batch_size=1, caption_dropout_rate=0.5)
    straight = build_dataloader(specs, seed=7, shuffle=True, rank=1, world_size=2)
    straight.set_epoch(1)
    it = iter(straight)
    head = _trace(next(it) for _ in range(2))
    state = straight.state_dict()
    rest = _trace(it)
    resumed = build_dataloader(specs, seed=7, shuffle=True, rank=1, world_size=2, num_workers=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert (state["epoch"], state["position"], state["world_size"]) == (1, 2, 2)
    assert _trace(resumed) == rest and len(head) + len(rest) == len(straight)


def test_ddp_without_a_single_global_batch_is_a_user_error(cached):
    with pytest.raises(UserError, match="no batch for 3 processes.*lower batch_size"):
        build_dataloader(_specs(cached, batch_size=2), seed=0, shuffle=True, rank=0, world_size=3)


def test_workers_give_the_same_batches(cached):
    specs = _specs(cached, caption_dropout_rate=0.5)
    plain = build_dataloader(specs, seed=2, shuffle=True)
    workers = build_dataloader(specs, seed=2, shuffle=True, num_workers=2, persistent_workers=True)
    assert _trace(plain) + _trace(plain) == _trace(workers) + _trace(workers)
    it = iter(workers)
    next(it), next(it)
    assert workers.state_dict()["position"] == 2


def test_missing_caches_are_reported(tmp_path, caplog):
    make_synthetic_dataset(tmp_path, seed=1, num_images=3, num_videos=1)
    spec_i, spec_v = _specs(tmp_path)
    with pytest.raises(UserError) as err:
        build_dataloader([spec_i, spec_v], seed=0, shuffle=True)
    assert "wantrainer cache-latents" in str(err.value) and "0 of 3 item(s) usable" in str(err.value)

    _write_caches(spec_i, text=False)
    with pytest.raises(UserError, match="wantrainer cache-text"):
        build_dataloader([spec_i], seed=0, shuffle=True)

    _write_caches(spec_i)
    item = scan_dataset(spec_i).items[0]
    item.text_cache_path.unlink()
    stale = spec_i.cache_directory / latent_cache_name("image_001", 16, 256)
    shutil.move(scan_dataset(spec_i).items[1].latent_cache_path, stale)
    with caplog.at_level(logging.WARNING):
        loader = build_dataloader([spec_i, spec_v], seed=0, shuffle=True)
    report = loader.reports[0]
    assert (report.usable, report.missing_text, report.stale_latents) == (1, [item.key], ["image_001"])
    assert loader.reports[1].missing_latents == ["clip_000_00000-009", "clip_000_00000-017"]
    assert "1 of 3 item(s) usable" in caplog.text and "without text cache" in caplog.text
    assert _keys(loader) == [("image_002",)]


def test_state_saved_after_the_last_batch_continues_with_the_next_epoch(cached):
    specs = _specs(cached)
    straight = build_dataloader(specs, seed=8, shuffle=True)
    it = iter(straight)
    for _ in range(len(straight)):
        next(it)  # the consumer stops at the epoch's length without exhausting the iterator
    state = straight.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    straight.set_epoch(1)
    expected = _keys(straight)
    resumed = build_dataloader(specs, seed=8, shuffle=True)
    resumed.load_state_dict(state)
    assert _keys(resumed) == expected


def _musubi_files(folder: Path, latents: dict[str, tuple[int, ...]], texts: list[str]) -> None:
    """Cache files as musubi-tuner writes them (plain save_file, literal names and keys), latents filled with 7."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in latents.items():
        key = f"latents_{shape[1]}x{shape[2]}x{shape[3]}_bfloat16"
        width, height = (int(v) for v in name.split("_")[-2].split("x"))
        meta = {"architecture": "wan", "width": str(width), "height": str(height), "format_version": "1.0.1"}
        save_file({key: torch.full(shape, 7.0, dtype=torch.bfloat16)}, str(folder / name), metadata=meta)
    for name in texts:
        save_file({"varlen_t5_bfloat16": torch.ones(5, TEXT_DIM, dtype=torch.bfloat16)}, str(folder / name),
                  metadata={"architecture": "wan", "caption1": "a shape", "format_version": "1.0.1"})


def _musubi_media(root: Path) -> list:
    """A 96x64 image and a 96x64 clip of 12 frames with captions; specs at resolution 64 with buckets."""
    (root / "images").mkdir()
    (root / "videos").mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(root / "images" / "photo.png")
    write_mp4(root / "videos" / "walk.mp4", [np.full((64, 96, 3), 40 * i % 255, dtype=np.uint8) for i in range(12)])
    for path in (root / "images" / "photo.txt", root / "videos" / "walk.txt"):
        path.write_text("a shape\n", encoding="utf-8")
    datasets = {"general": {"resolution": 64, "enable_bucket": True},
                "train": [{"image_directory": "images", "cache_directory": "ci"},
                          {"video_directory": "videos", "cache_directory": "cv", "target_frames": [9]}]}
    return resolve_datasets(parse_config({"datasets": datasets}, config_dir=root).datasets, "train")


def test_musubi_named_caches_are_found_and_used(tmp_path):
    specs = _musubi_media(tmp_path)
    # names carry the source size (image) and musubi's bucketed frame size (video); the latents the 80x48 bucket
    _musubi_files(tmp_path / "ci", {"photo_0096x0064_wan.safetensors": (16, 1, 6, 10)}, ["photo_wan_te.safetensors"])
    _musubi_files(tmp_path / "cv", {"walk_00000-009_0080x0048_wan.safetensors": (16, 3, 6, 10)},
                  ["walk_wan_te.safetensors"])
    loader = build_dataloader(specs, seed=0, shuffle=False)
    assert [r.usable for r in loader.reports] == [1, 1]
    batches = {b["keys"][0]: b for b in loader}
    assert set(batches) == {"photo", "walk_00000-009"}
    assert batches["photo"]["latents"].shape == (1, 16, 1, 6, 10)
    assert batches["walk_00000-009"]["latents"].shape == (1, 16, 3, 6, 10)
    assert all(torch.all(b["latents"] == 7.0) and b["text_embeds"][0].shape == (5, TEXT_DIM) for b in batches.values())


def test_a_cache_of_another_shape_is_stale_never_used(tmp_path, caplog):
    specs = _musubi_media(tmp_path)
    # the right names, but latents made at 64x64 (e.g. with enable_bucket off): stale for the 80x48 bucket
    _musubi_files(tmp_path / "ci", {"photo_0096x0064_wan.safetensors": (16, 1, 8, 8)}, ["photo_wan_te.safetensors"])
    _musubi_files(tmp_path / "cv", {"walk_00000-009_0080x0048_wan.safetensors": (16, 3, 6, 10)},
                  ["walk_wan_te.safetensors"])
    with caplog.at_level(logging.WARNING):
        loader = build_dataloader(specs, seed=0, shuffle=False)
    assert (loader.reports[0].usable, loader.reports[0].stale_latents) == (0, ["photo"])
    assert "1 with a stale latent cache" in caplog.text and "wantrainer cache-latents" in caplog.text
    assert [b["keys"] for b in loader] == [["walk_00000-009"]]
    with pytest.raises(UserError, match="stale latent cache.*\n.*wantrainer cache-latents"):
        build_dataloader(specs[:1], seed=0, shuffle=False)


def _add_dtype(path: Path, key_prefix: str) -> None:
    """Re-cache ``path`` in another dtype as musubi-tuner does: the old tensor stays next to the new one."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    (key,) = [k for k in tensors if k.startswith(key_prefix)]
    tensors[key.rsplit("_", 1)[0] + "_float16"] = tensors[key].to(torch.float16)
    save_file(tensors, str(path), metadata={"architecture": "wan", "format_version": "1.0.1"})


def test_caches_recached_in_another_dtype_are_reported_not_read(tmp_path, caplog):
    make_synthetic_dataset(tmp_path, seed=3, num_images=3, num_videos=0)
    (spec,) = _specs(tmp_path, batch_size=1)[:1]
    _write_caches(spec)
    items = scan_dataset(spec).items
    _add_dtype(items[0].latent_cache_path, "latents_")
    _add_dtype(items[1].text_cache_path, "varlen_t5_")
    with caplog.at_level(logging.WARNING):
        loader = build_dataloader([spec], seed=0, shuffle=False)
    assert [key for batch in loader for key in batch["keys"]] == [items[2].key]
    (report,) = loader.reports
    assert report.stale_latents == [items[0].key] and report.stale_text == [items[1].text_cache_path.name]
    summary = report.summary()
    assert items[1].text_cache_path.name in summary and "`wantrainer cache-text` with skip_existing = false" in summary
    assert f"{items[0].latent_cache_path.name} holds 2 latents_FxHxW_dtype tensors" in caplog.text

    _add_dtype(items[2].text_cache_path, "varlen_t5_")
    with pytest.raises(UserError, match=r"(?s)1 with a stale latent cache.*2 text cache file\(s\) holding several "
                                        r"varlen_t5 tensors.*cache-text --config <your config>` with skip_existing = false"):
        build_dataloader([spec], seed=0, shuffle=False)


def _vma_rss(pid: int, address: int) -> int:
    """Resident bytes of the mapping of ``pid`` that holds ``address`` (0 when nothing is mapped there)."""
    rss, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
    return rss


def _ppid(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("PPid:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_workers_start_without_the_model(cached):
    """A 256 MB tensor stands for the loaded model: forked workers map its pages (the old behaviour, measured
    with the "fork" start method), the default workers (forkserver) do not map it at all."""
    import os

    from wantrainer.utils.memory import child_pids

    model = torch.ones(64, 1024, 1024)  # touched: resident in this process
    address = model.data_ptr() + model.nbytes // 2
    own_cmdline = Path("/proc/self/cmdline").read_bytes()
    seen = {}
    for method in ("fork", None):
        before = set(child_pids())
        loader = build_dataloader(_specs(cached), seed=0, shuffle=False, num_workers=2, persistent_workers=True,
                                  start_method=method)
        it = iter(loader)
        next(it)
        # workers: forked from this process (same command line) or from the forkserver (not this process's child)
        workers = [pid for pid in set(child_pids()) - before
                   if _ppid(pid) != os.getpid() or Path(f"/proc/{pid}/cmdline").read_bytes() == own_cmdline]
        seen[method] = [_vma_rss(pid, address) for pid in workers]
        del it, loader
    assert len(seen["fork"]) == 2 and all(r > 0.9 * model.nbytes for r in seen["fork"]), seen
    assert len(seen[None]) == 2 and all(r < 0.01 * model.nbytes for r in seen[None]), seen


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_process_tree_pss_counts_the_children():
    import subprocess
    import sys

    from wantrainer.utils.memory import process_tree_pss, pss_bytes

    child = subprocess.Popen([sys.executable, "-c", "import sys, time; x = bytearray(200 << 20); "
                              "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"ready"
        tree, own = process_tree_pss(), pss_bytes()
        assert tree - own > 190 << 20  # the child's 200 MB (private pages count whole in PSS)
    finally:
        child.kill()
        child.wait()
