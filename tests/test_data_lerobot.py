"""LeRobot v3.0 interop: export -> import is exact for state data and within the stated codec
tolerance for video frames; a dataset written here in LeRobot's own layout (list columns, pandas
task index, two episodes per video file, per-episode stats columns) imports; bad input names the
file and key."""

import io
import json
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffpolicy.data import DataFormatError, ReplayBuffer
from diffpolicy.data.lerobot import VIDEO_TOLERANCE, export_lerobot, import_lerobot
from diffpolicy.errors import DiffpolicyError, MissingFileError

FPS = 10


def scene(length, height, width, phase):
    """Frames like a rendered scene: a sharp moving disk on a gently shaded floor, uint8 (T, H, W, 3)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(length):
        cx, cy = width * (0.3 + 0.04 * t), height * (0.5 + 0.2 * np.sin(phase + t / 3))
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2) < (height / 5) ** 2
        image = np.stack([200 + 40 * xx / width, 200 + 40 * yy / height, np.full_like(xx, 180.0 + 20 * phase)], -1)
        image[disk] = (230, 40, 40)
        frames.append(image)
    return np.asarray(frames, dtype=np.uint8)


def state_buffer(path, rng, lengths=(6, 9, 4), image=False):
    buffer = ReplayBuffer.create(path, attrs={"task": "pusht", "task_card": {"control_hz": float(FPS)},
                                              "collection": {"seed_start": 0}})
    for index, length in enumerate(lengths):
        data = {
            "action": rng.uniform(0, 512, size=(length, 2)),
            "agent_pos": rng.normal(size=(length, 2)).astype(np.float32),
            "keypoints": rng.normal(size=(length, 9, 2)).astype(np.float32),
            "reward": rng.normal(size=length).astype(np.float32),
            "contact": rng.integers(0, 2, size=(length, 1)).astype(bool),
        }
        if image:
            data["image"] = scene(length, 37, 48, phase=index)
        buffer.add_episode(data, {"seed": np.int32(index), "success": bool(index % 2), "return": rng.normal(),
                                  "note": f"episode {index}",
                                  "final_obs.agent_pos": rng.normal(size=2).astype(np.float32)})
    return buffer


def assert_same_state(source, result, skip=()):
    assert result.keys() == source.keys() and result.meta_keys() == source.meta_keys()
    np.testing.assert_array_equal(result.episode_ends, source.episode_ends)
    for key in source.keys():
        if key in skip:
            continue
        original, back = np.asarray(source[key]), np.asarray(result[key])
        assert back.dtype == original.dtype and back.shape == original.shape, key
        assert back.tobytes() == original.tobytes(), key
    for name in source.meta_keys():
        original, back = source.episode_meta(name), result.episode_meta(name)
        assert back.dtype == original.dtype and back.shape == original.shape, name
        np.testing.assert_array_equal(back, original, err_msg=name)
    assert dict(result.attrs) == dict(source.attrs)


def test_state_round_trip_is_exact_across_several_data_files(tmp_path):
    source = state_buffer(tmp_path / "src.zarr", np.random.default_rng(0))
    out = export_lerobot(source, tmp_path / "lerobot", data_files_size_in_mb=1e-4)
    assert sorted(p.name for p in (out / "data" / "chunk-000").iterdir()) == \
        ["file-000.parquet", "file-001.parquet", "file-002.parquet"]
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS and info["total_frames"] == 19
    assert info["features"]["observation.keypoints"]["shape"] == [9, 2]
    assert info["features"]["next.reward"] == {"dtype": "float32", "shape": [1], "names": None}
    assert info["features"]["observation.contact"] == {"dtype": "bool", "shape": [1], "names": None}
    schema = pq.read_schema(out / "data" / "chunk-000" / "file-000.parquet")
    # shape [1] is a scalar column and [D] a fixed-size list, as Hugging Face's Value / Sequence(length=D)
    assert schema.field("observation.contact").type == pa.bool_() and schema.field("next.reward").type == pa.float32()
    assert schema.field("action").type == pa.list_(pa.float64(), 2)
    assert info["video_path"] is None and not (out / "videos").exists()
    stats = json.loads((out / "meta" / "stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["mean"], np.asarray(source["action"]).mean(0))
    assert stats["action"]["count"] == [19]
    episodes = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [(e["dataset_from_index"], e["dataset_to_index"], e["data/file_index"]) for e in episodes] == \
        [(0, 6, 0), (6, 15, 1), (15, 19, 2)]
    assert episodes[1]["tasks"] == ["pusht"] and episodes[1]["seed"] == 1
    second = np.asarray(source["action"])[6:15]
    np.testing.assert_allclose(episodes[1]["stats/action/max"], second.max(0))
    np.testing.assert_allclose(episodes[1]["stats/action/std"], second.std(0))
    assert episodes[1]["stats/next.reward/count"] == [9]

    result = import_lerobot(out, tmp_path / "back.zarr")
    assert_same_state(source, result)
    # export -> import -> export writes the same data files
    again = export_lerobot(result, tmp_path / "again", data_files_size_in_mb=1e-4)
    for name in ("file-000.parquet", "file-002.parquet"):
        first, second = (pq.read_table(d / "data" / "chunk-000" / name) for d in (out, again))
        assert first.equals(second), name


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])  # mpeg4: the fallback where PyAV lacks libx264
def test_video_round_trip_within_codec_tolerance(tmp_path, monkeypatch, codec):
    import diffpolicy.data.lerobot.export as export_module

    monkeypatch.setattr(export_module, "pick_codec", lambda: codec)
    source = state_buffer(tmp_path / "src.zarr", np.random.default_rng(1), image=True)
    out = export_lerobot(source, tmp_path / "lerobot")
    info = json.loads((out / "meta" / "info.json").read_text())
    image = info["features"]["observation.image"]
    assert image["dtype"] == "video" and image["shape"] == [37, 48, 3]
    assert image["info"]["video.codec"] == {"libx264": "h264", "mpeg4": "mpeg4"}[codec]
    assert (image["info"]["video.height"], image["info"]["video.width"]) == (38, 48)  # padded to even
    episodes = pq.read_table(out / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["videos/observation.image/from_timestamp"] for e in episodes] == pytest.approx([0.0, 0.6, 1.5])
    assert "observation.image" not in pq.read_table(out / "data" / "chunk-000" / "file-000.parquet").column_names
    first = np.asarray(source["image"])[:6] / 255.0
    np.testing.assert_allclose(np.asarray(episodes[0]["stats/observation.image/mean"]).reshape(3),
                               first.mean(axis=(0, 1, 2)))  # per channel, shape (3, 1, 1), in [0, 1]

    result = import_lerobot(out, tmp_path / "back.zarr")
    assert_same_state(source, result, skip=("image",))
    original, back = np.asarray(source["image"]).astype(float), np.asarray(result["image"]).astype(float)
    assert back.shape == original.shape
    for step in range(len(original)):  # every frame, so a frame from the wrong time would fail
        error = np.abs(back[step] - original[step])
        psnr = 10 * np.log10(255 ** 2 / max((error ** 2).mean(), 1e-12))
        assert error.mean() <= VIDEO_TOLERANCE["mean_abs_error"] and psnr >= VIDEO_TOLERANCE["psnr_db"], step
        others = [np.abs(back[step] - original[other]).mean() for other in range(len(original)) if other != step]
        assert error.mean() < min(others), step  # closest to its own frame: no shift between episodes


def test_png_image_round_trip_is_exact(tmp_path):
    source = state_buffer(tmp_path / "src.zarr", np.random.default_rng(10), image=True)
    out = export_lerobot(source, tmp_path / "lerobot", images="png", data_files_size_in_mb=1e-4)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["features"]["observation.image"]["dtype"] == "image" and info["video_path"] is None
    column = pq.read_table(out / "data" / "chunk-000" / "file-001.parquet")["observation.image"]
    assert column.type.names == ["bytes", "path"] and column[0]["bytes"].as_py()[:4] == b"\x89PNG"
    assert_same_state(source, import_lerobot(out, tmp_path / "back.zarr"))  # images included: bit-exact


def png_bytes(image):
    """PNG bytes written by Pillow (as Hugging Face datasets stores an Image feature)."""
    from PIL import Image

    stream = io.BytesIO()
    Image.fromarray(image).save(stream, format="PNG")
    return stream.getvalue()


def write_native_dataset(root, rng, lengths=(5, 8), height=24, width=32):
    """Two episodes in LeRobot's own style: variable-length list columns, timestamps, the task as a
    pandas index, per-episode stats columns, both episodes in one video file whose stream has
    LeRobot's ffmpeg time base."""
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    video_dir = root / "videos" / "observation.images.top" / "chunk-000"
    video_dir.mkdir(parents=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
        "observation.images.wrist": {"dtype": "image", "shape": [6, 10, 3], "names": ["height", "width", "channel"]},
        "observation.images.top": {"dtype": "video", "shape": [height, width, 3],
                                   "names": ["height", "width", "channels"],
                                   "info": {"video.fps": FPS, "video.codec": "h264"}},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v3.0", "robot_type": "so100", "total_episodes": len(lengths),
            "total_frames": sum(lengths), "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "fps": FPS, "splits": {"train": "0:2"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": ["pick the cube", "place it"]}),
                   root / "meta" / "tasks.parquet")
    expected = {"state": [], "action": [], "done": [], "images": [], "wrist": []}
    rows, episodes, start = [], [], 0
    for index, length in enumerate(lengths):
        state = rng.normal(size=(length, 3)).astype(np.float32)
        action = rng.normal(size=(length, 3)).astype(np.float32)
        done = np.arange(length) == length - 1
        expected["state"].append(state), expected["action"].append(action), expected["done"].append(done)
        expected["images"].append(scene(length, height, width, phase=index))
        wrist = rng.integers(0, 256, size=(length, 6, 10, 3), dtype=np.uint8)
        expected["wrist"].append(wrist)
        rows.append(pa.table({
            "observation.state": pa.array(state.tolist(), pa.list_(pa.float32())),
            "action": pa.array(action.tolist(), pa.list_(pa.float32())),
            "next.done": pa.array(done),
            "observation.images.wrist": pa.array([{"bytes": png_bytes(image), "path": None} for image in wrist],
                                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "timestamp": pa.array((np.arange(length) / FPS).astype(np.float32)),
            "frame_index": pa.array(np.arange(length)),
            "episode_index": pa.array(np.full(length, index)),
            "index": pa.array(np.arange(start, start + length)),
            "task_index": pa.array(np.full(length, index)),
        }))
        episodes.append({"episode_index": index, "tasks": [["pick the cube", "place it"][index]], "length": length,
                         "data/chunk_index": 0, "data/file_index": index, "dataset_from_index": start,
                         "dataset_to_index": start + length, "videos/observation.images.top/chunk_index": 0,
                         "videos/observation.images.top/file_index": 0,
                         "videos/observation.images.top/from_timestamp": start / FPS,
                         "videos/observation.images.top/to_timestamp": (start + length) / FPS,
                         "stats/action/mean": action.mean(0).tolist(), "operator": f"op{index}",
                         "annotations": [index, index + 1]})  # a list column: not episode meta
        pq.write_table(rows[-1], root / "data" / "chunk-000" / f"file-{index:03d}.parquet")
        start += length
    pq.write_table(pa.Table.from_pylist(episodes), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    with av.open(str(video_dir / "file-000.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 15360)
        stream.options = {"crf": "15"}
        for i, image in enumerate(np.concatenate(expected["images"])):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i * 15360 // FPS, Fraction(1, 15360)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    (root / "meta" / "stats.json").write_text("{}")
    return {key: np.concatenate(value) for key, value in expected.items()}


def test_imports_a_dataset_in_lerobots_own_style(tmp_path):
    expected = write_native_dataset(tmp_path / "native", np.random.default_rng(2))
    buffer = import_lerobot(tmp_path / "native", tmp_path / "native.zarr")
    assert buffer.keys() == ["action", "images.top", "images.wrist", "next.done", "state"]
    np.testing.assert_array_equal(buffer["images.wrist"][:], expected["wrist"])
    np.testing.assert_array_equal(buffer.episode_ends, [5, 13])
    np.testing.assert_array_equal(buffer["state"][:], expected["state"])
    np.testing.assert_array_equal(buffer["action"][:], expected["action"])
    np.testing.assert_array_equal(buffer["next.done"][:], expected["done"])
    error = np.abs(np.asarray(buffer["images.top"]).astype(float) - expected["images"])
    assert error.mean(axis=(1, 2, 3)).max() <= VIDEO_TOLERANCE["mean_abs_error"]
    psnr = 10 * np.log10(255 ** 2 / (error ** 2).mean(axis=(1, 2, 3)))
    assert psnr.min() >= VIDEO_TOLERANCE["psnr_db"]
    assert list(buffer.episode_meta("task")) == ["pick the cube", "place it"]
    assert list(buffer.episode_meta("operator")) == ["op0", "op1"]
    assert buffer.meta_keys() == ["operator", "task"]
    lerobot = buffer.attrs["lerobot"]
    assert lerobot["tasks"] == ["pick the cube", "place it"] and lerobot["fps"] == FPS
    assert lerobot["robot_type"] == "so100"


def test_missing_info_json(tmp_path):
    (tmp_path / "ds" / "meta").mkdir(parents=True)
    with pytest.raises(MissingFileError, match=r"meta/info\.json does not exist"):
        import_lerobot(tmp_path / "ds", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


def test_old_codebase_version(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(3))
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(DataFormatError, match=r"codebase_version is 'v2.1', expected 'v3.0'"):
        import_lerobot(root, tmp_path / "out.zarr")


@pytest.mark.parametrize("change, message", [
    ({"shape": [4]}, r"file-000\.parquet: column 'observation\.state': info\.json says shape \[4\], "
                     r"the parquet column has \[3\]"),
    ({"dtype": "float64"}, r"file-000\.parquet: column 'observation\.state': info\.json says dtype float64, "
                           r"the parquet column holds float32"),
])
def test_features_that_disagree_with_the_parquet_schema(tmp_path, change, message):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(4))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.state"].update(change)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=message):
        import_lerobot(root, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


def test_feature_missing_from_the_parquet_and_column_missing_from_the_features(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(5))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [3], "names": None}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=r"file-000\.parquet: info\.json lists feature 'observation\.velocity' "
                                              r"but the parquet file has no such column"):
        import_lerobot(root, tmp_path / "out.zarr")
    del info["features"]["observation.velocity"], info["features"]["next.done"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=r"file-000\.parquet: columns \['next\.done'\] are not features"):
        import_lerobot(root, tmp_path / "out.zarr")


def test_missing_data_file_and_string_feature(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(9))
    (root / "data" / "chunk-000" / "file-001.parquet").unlink()
    with pytest.raises(MissingFileError, match=r"data file .*file-001\.parquet named by meta/episodes does not exist"):
        import_lerobot(root, tmp_path / "out.zarr")
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.language"] = {"dtype": "string", "shape": [1], "names": None}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=r"info\.json: feature 'observation\.language': dtype 'string' "
                                              r"is not supported"):
        import_lerobot(root, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()


def test_two_features_for_one_data_key(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(11))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["state"] = info["features"]["observation.state"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataFormatError, match=r"features \['observation\.state', 'state'\] would all become the data "
                                              r"key 'state'"):
        import_lerobot(root, tmp_path / "out.zarr")


def test_missing_video_file(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(6))
    video = root / "videos" / "observation.images.top" / "chunk-000" / "file-000.mp4"
    video.unlink()
    with pytest.raises(MissingFileError, match=rf"episode 0\): video file {video} of key 'observation\.images\.top' "
                                               r"does not exist"):
        import_lerobot(root, tmp_path / "out.zarr")


def test_video_shorter_than_its_episodes(tmp_path):
    root = tmp_path / "ds"
    write_native_dataset(root, np.random.default_rng(7))
    table = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    table[1]["videos/observation.images.top/from_timestamp"] = 1.0  # 8 frames from 1.0 s: past the end
    pq.write_table(pa.Table.from_pylist(table), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    with pytest.raises(DataFormatError, match=r"file-000\.mp4 \(key 'observation\.images\.top'\) ends after 3 of "
                                              r"the episode's 8 frames"):
        import_lerobot(root, tmp_path / "out.zarr")


def test_export_needs_fps_and_refuses_to_overwrite(tmp_path):
    buffer = ReplayBuffer.create(tmp_path / "a.zarr")
    buffer.add_episode({"action": np.zeros((3, 2))})
    with pytest.raises(DiffpolicyError, match=r"records no task_card\.control_hz; pass fps="):
        export_lerobot(buffer, tmp_path / "out")
    export_lerobot(buffer, tmp_path / "out", fps=5)
    with pytest.raises(FileExistsError, match="already exists"):
        export_lerobot(buffer, tmp_path / "out", fps=5)


def test_command_line_export_and_import(tmp_path, capsys):
    from diffpolicy.cli import main

    source = state_buffer(tmp_path / "src.zarr", np.random.default_rng(8))
    assert main(["dataset", "export-lerobot", str(tmp_path / "src.zarr"), str(tmp_path / "lr"),
                 "--task", "push the T onto the target"]) == 0
    assert main(["dataset", "import-lerobot", str(tmp_path / "lr"), str(tmp_path / "back.zarr")]) == 0
    out, _ = capsys.readouterr()
    assert "exported 3 episodes (19 frames)" in out and "imported 3 episodes (19 steps" in out
    tasks = pq.read_table(tmp_path / "lr" / "meta" / "tasks.parquet").to_pylist()
    assert tasks == [{"task_index": 0, "task": "push the T onto the target"}]
    assert_same_state(source, ReplayBuffer.open(tmp_path / "back.zarr"))

    assert main(["dataset", "import-lerobot", str(tmp_path / "lr"), str(tmp_path / "back.zarr")]) == 2
    assert main(["dataset", "import-lerobot", str(tmp_path / "src.zarr"), str(tmp_path / "x.zarr")]) == 2
    _, err = capsys.readouterr()
    assert "back.zarr already exists" in err
    assert f"{tmp_path / 'src.zarr'} is not a LeRobot dataset: {tmp_path / 'src.zarr' / 'meta' / 'info.json'} " \
           "does not exist" in err and "Traceback" not in err
