"""ImageNet's shape at CI size: the generator's structure, and one validation pass over
8 ranks x 4 loaders reading each shard once (bench/scale_drill.py runs it at full size)."""
import numpy as np
import pytest

from bench.imagenet_shaped import CLASSES, MIN_VAL_SHARDS, TRAIN_TOTAL, class_counts, generate, scaled
from bench.scale_drill import former_pass, measured_run, val_pass
from orchestrator.data.dataset import open_split
from orchestrator.data.streams import EvalStream
from orchestrator.base.errors import UserError


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet-shaped"))
    generate(root, scale=0.01, progress=False)
    return root


def test_class_counts_have_ilsvrc_2012s_spread():
    counts = class_counts()
    assert len(counts) == CLASSES and counts.sum() == TRAIN_TOTAL == 1_281_167
    assert counts.min() == 732 and counts.max() == 1300
    assert np.array_equal(counts, class_counts())  # seeded
    small = scaled(counts, 0.01)
    assert small.min() >= 7 and small.max() == 13


def test_the_generated_set_is_imagenet_shaped(shaped):
    train, val = open_split(shaped, "train"), open_split(shaped, "val")
    assert train.num_classes == val.num_classes == 1000
    assert len(val.manifest.shards("val")) >= MIN_VAL_SHARDS
    labels = train.all_labels()
    assert np.array_equal(np.bincount(labels, minlength=1000), scaled(class_counts(), 0.01))
    assert np.array_equal(np.bincount(val.all_labels()), np.full(1000, 1))
    sample = next(iter(val.iter_samples()))
    assert sample.data[:2] == b"\xff\xd8" and len(sample.data) < 2000  # a small JPEG


def test_a_validation_pass_reads_each_shard_once_over_all_slots(shaped):
    val = open_split(shaped, "val")
    size = sum(s.bytes for s in val.manifest.shards("val"))
    read, seen = val_pass(val, 8 * 4)
    assert read <= 1.05 * size  # the bound; the reader gets exactly 1.0
    assert np.array_equal(seen, val.all_labels())  # every sample once, at its index, with its label
    assert former_pass(val, 8 * 4) == 32 * size  # the former reader: every slot read everything


def test_spare_slots_read_nothing_and_the_parts_still_cover_the_split(shaped):
    val = open_split(shaped, "val")
    shards = len(val.manifest.shards("val"))
    slots = shards + 5
    parts = [list(val.iter_indexed(me, slots)) for me in range(slots)]
    assert all(not part for part in parts[shards:])
    assert sorted(i for part in parts for i, _ in part) == list(range(len(val)))


def test_eval_stream_indices_match_the_labels_file(shaped):
    val = open_split(shaped, "val")
    rows = [(i, label) for r in range(2) for i, _, label in EvalStream(val, lambda img: img[:, :4, :4], r, 2)]
    labels = val.all_labels()
    assert sorted(i for i, _ in rows) == list(range(len(val)))
    assert all(labels[i] == label for i, label in rows)


def test_a_tampered_labels_file_is_refused(shaped, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shaped, copy)
    np.save(copy / "val-labels.npy", np.zeros(1000, dtype=np.int32))
    with pytest.raises(UserError, match="does not match its sha256"):
        open_split(str(copy), "val").all_labels()


def test_label_shuffling_on_a_streamed_split_draws_exactly_n_per_class_over_all_ranks(shaped):
    """Hikvision's rule at 1,000 classes, streamed: every class N times per pass over 8
    ranks x 2 loaders together, equal parts per rank, each rank reading only its shards."""
    from orchestrator.data.streams import TrainStream

    train = open_split(shaped, "train")
    labels = train.all_labels()
    n_max, world = int(np.bincount(labels).max()), 8
    per_class, per_rank = np.zeros(1000, dtype=np.int64), []
    for rank in range(world):
        stream = TrainStream(train, None, rank, world, seed=3, label_shuffling=True)
        assert stream.samples_per_pass() == 1000 * n_max
        got = [s.label for slot in range(2) for s in stream._one_pass(0, slot, 2)]
        per_rank.append(len(got))
        per_class += np.bincount(got, minlength=1000)
    assert (per_class == n_max).all()  # 1000 x 13 = 13,000 draws, none dropped
    assert per_rank == [1000 * n_max // world] * world
    # a new pass draws again (another choice of the ceil(N/n) samples), still exactly N per class
    again = TrainStream(train, None, 0, world, seed=3, label_shuffling=True)
    assert sorted(s.key for s in again._one_pass(1, 0, 1)) != sorted(
        s.key for s in TrainStream(train, None, 0, world, seed=3, label_shuffling=True)._one_pass(0, 0, 1))


def test_pass_copies_balance_ranks_and_drop_nothing():
    from orchestrator.data.sampling import pass_copies

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), [5, 9, 6, 9, 8, 7, 6])  # ILSVRC-like: every class over N/2
    rng.shuffle(labels)
    owner = np.arange(len(labels)) // 4 % 3  # shards of 4 samples over 3 ranks
    copies = pass_copies(labels, owner, 3, seed=1, label_shuffling=True)
    assert (np.bincount(owner, weights=copies) == 7 * 9 // 3).all()  # 63 draws: 21 per rank
    assert (np.bincount(labels, weights=copies) == 9).all()
    assert set(copies.tolist()) <= {1, 2}  # floor(9/n) or ceil(9/n) per sample
    owner = np.arange(len(labels)) // 4 % 4  # the same shards over 4 ranks
    copies = pass_copies(labels, owner, 4, seed=1, label_shuffling=True)  # 63 = 4 x 15 + 3: parts of 16 and 15
    assert np.bincount(owner, weights=copies, minlength=4).tolist() == [16, 16, 16, 15]
    assert (np.bincount(labels, weights=copies) == 9).all()
    # a class of one sample on one rank takes all its 9 draws there: the ranks still come out equal
    skewed = np.repeat(np.arange(3), [9, 9, 1])
    owner = np.array([0] * 10 + [1] * 9)
    copies = pass_copies(skewed, owner, 2, seed=0, label_shuffling=True)
    assert np.bincount(owner, weights=copies).tolist() == [14, 13]


def test_a_streamed_minival_is_carved_once_then_read_from_its_own_file(shaped, tmp_path, monkeypatch):
    """The first carve reads train's shards; a second member start, a resume or a rank
    (a new process: a new Split) reads only the stored minival; a changed manifest carves
    again."""
    import dataclasses
    import shutil

    from orchestrator.data import dataset, minival_store
    from orchestrator.data.dataset import carve_minival

    monkeypatch.setenv("ENSEMBLE_DATA_CACHE", str(tmp_path / "cache"))
    reads = []
    real = dataset.iter_shard
    monkeypatch.setattr(dataset, "iter_shard", lambda url, *a: reads.append(url) or real(url, *a))
    _, first = carve_minival(open_split(shaped, "train"), 2, 0)
    assert len(set(reads)) == len(open_split(shaped, "train").urls())  # the one pass
    reads.clear()
    rest, again = carve_minival(open_split(shaped, "train"), 2, 0)
    assert reads == [] and [(s.key, s.data, s.label) for s in again.records] == \
        [(s.key, s.data, s.label) for s in first.records]
    folder = tmp_path / "cache" / "minival"
    stored = [*folder.glob("*.bin"), *folder.glob("*.json")]
    own = sum(len(s.data) for s in first.records)
    assert len(stored) == 2 and sum(f.stat().st_size for f in stored) <= 1.05 * own  # what a start reads
    # another seed or size is another minival; so is the same data under a changed manifest
    carve_minival(open_split(shaped, "train"), 2, 1)
    assert reads and len(list((tmp_path / "cache" / "minival").glob("*.json"))) == 2
    copy = tmp_path / "copy"  # the same data at another root
    shutil.copytree(shaped, copy)
    reads.clear()
    carve_minival(open_split(str(copy), "train"), 2, 0)
    assert reads
    whole = open_split(shaped, "train")
    shards = whole.manifest.shards("train")
    key = minival_store.key_of(shaped, "train", 2, 0, whole.kept, shards)
    regenerated = [dataclasses.replace(shards[0], sha256="0" * 64), *shards[1:]]
    assert minival_store.key_of(shaped, "train", 2, 0, whole.kept, regenerated) != key


def test_a_minival_carved_from_a_streamed_split_holds_only_its_own_samples(shaped):
    """At ImageNet scale train cannot be read into memory to carve a minival: it is carved
    by the labels file, only the minival's samples are held, and the rest streams with
    them skipped, plain or label-shuffled."""
    from orchestrator.data.dataset import carve_minival
    from orchestrator.data.streams import TrainStream

    whole = open_split(shaped, "train")
    rest, held = carve_minival(whole, 2, 0)
    assert rest.records is None and len(held.records) == 2000 and len(rest) == len(whole) - 2000
    held_keys = {s.key for s in held.records}
    assert np.array_equal(np.bincount([s.label for s in held.records]), np.full(1000, 2))
    streamed = [s.key for s in rest.iter_samples()]
    assert len(streamed) == len(rest) and not held_keys & set(streamed)
    assert np.array_equal(rest.all_labels(), [s.label for s in rest.iter_samples()])
    # the same split by name, as a member or an evaluation opens it
    again = open_split(shaped, "train@rest:2:0")
    assert np.array_equal(again.exclude, rest.exclude)
    # label-shuffled over 4 ranks: every class N' times (N' = the largest class of the rest)
    n_max = int(np.bincount(rest.all_labels()).max())
    per_class = np.zeros(1000, dtype=np.int64)
    for rank in range(4):
        got = list(TrainStream(rest, None, rank, 4, seed=1, label_shuffling=True)._one_pass(0, 0, 1))
        assert not held_keys & {s.key for s in got}
        per_class += np.bincount([s.label for s in got], minlength=1000)
    assert (per_class == n_max).all()
    plain = [s.key for s in TrainStream(rest, None, 0, 1, seed=1)._one_pass(0, 0, 1)]
    assert len(plain) == len(rest) and not held_keys & set(plain)


def test_the_bounded_run_measures_the_trainer_and_its_loaders(shaped):
    # the drill's memory figure: label-shuffled steps on the streamed split in a fresh process
    got = measured_run(shaped, 5)
    assert got["steps"] == 5 and got["loaders"] >= 2  # training and held-out loader processes were seen
    assert 100 < got["loader_mb"] < got["trainer_mb"] < 4000


def test_cam_maps_are_built_in_one_pass_by_the_loaders_each_reading_its_own_shards(shaped, tmp_path, monkeypatch):
    import torch

    from bench.scale_drill import ReadCounter
    from models import build_model
    from orchestrator.data import streams
    from orchestrator.train.cam import cam_batches, cam_input, write_cam_maps

    split = open_split(shaped, "val")  # 1,000 images in 64+ shards: any split a teacher maps
    size = sum(s.bytes for s in split.manifest.shards("val"))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    # four loader slots between them read each shard once and yield each sample once
    keys = []
    with ReadCounter(split) as count:
        for me in range(4):
            monkeypatch.setattr(streams, "_slots", lambda me=me: (me, 4))
            keys += [key for key, _, _ in streams.KeyedStream(split, cam_input(32, mean, std))]
    monkeypatch.undo()
    assert count.bytes == size
    assert sorted(keys) == sorted(s.key for s in split.iter_samples())

    # built by 2 real loader processes, the maps are those of an in-process build, per key
    torch.manual_seed(0)
    teacher = build_model("resnet18", num_classes=1000, low_res=True).eval()
    cpu = torch.device("cpu")
    alone = write_cam_maps(str(tmp_path / "a"), teacher, cam_batches(split, 32, mean, std, 0, 100), len(split), cpu)
    loaders = write_cam_maps(str(tmp_path / "b"), teacher, cam_batches(split, 32, mean, std, 2, 100), len(split), cpu)
    assert list(alone) == list(loaders) == sorted(keys)
    assert loaders.maps.shape == (1000, 4, 4) and loaders.maps.dtype == np.float16
    for key in keys[::97]:
        assert torch.allclose(alone.get(key).float(), loaders.get(key).float(), atol=2e-3)
        assert abs(float(loaders.get(key).float().sum()) - 1.0) < 0.02  # a distribution over the image
    with pytest.raises(RuntimeError, match="expected"):  # a miscount is refused, not half-written
        write_cam_maps(str(tmp_path / "c"), teacher, cam_batches(split, 32, mean, std, 0, 100), 999, cpu)
    assert not (tmp_path / "c" / "maps.npy").exists()


def test_a_later_member_start_reads_only_its_stored_minival(shaped, tmp_path):
    """Two member processes on one machine: the first carves the minival from train, the
    second reads no train shard, only the stored minival (the drill's figure at 1%)."""
    from bench.scale_drill import measured_start

    first, later = (measured_start(shaped, 2, str(tmp_path)) for _ in range(2))
    assert first["train_shard_bytes"] > 0 and first["stored_bytes"] == 0
    assert later["train_shard_bytes"] == 0 and later["samples"] == first["samples"] == 2000
    assert later["minival_bytes"] <= later["stored_bytes"] <= 1.05 * later["minival_bytes"]
