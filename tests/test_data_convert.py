"""dora-convert: frames read back equal the video's, counts, resume, and one-line errors."""
import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess

import av
import numpy as np
from PIL import Image
import pytest

from dora_jax.cli import convert as convert_cli
from dora_jax.data import convert
from dora_jax.data import manifest as manifest_lib
from dora_jax.data import source
from dora_jax.data import synthetic
from dora_jax.data import tfrecord

NUM_FRAMES, BLANK = 30, (10, 11, 12)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("video") / "tour.mp4")
  synthetic.generate_walking_tour(path, num_frames=NUM_FRAMES, width=64, height=48, fps=10,
                                  num_objects=3, seed=1, blank_frames=BLANK)
  return path


def _decoded(path):
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _stored(data_dir, video_id):
  manifest = manifest_lib.load(data_dir)
  store = source.FrameStore(data_dir, manifest_lib.select_videos(manifest, (video_id,), data_dir))
  frames = [store.read_frame(0, i) for i in range(store.num_frames[0])]
  return manifest, frames


def _faststart_copy(path, out):
  """The same video remuxed with the index (moov) first, so a cut file still opens."""
  with av.open(path) as src, av.open(out, "w", options={"movflags": "faststart"}) as dst:
    stream = dst.add_stream_from_template(src.streams.video[0])
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        dst.mux(packet)
  return out


def test_frames_read_back_equal_the_video_and_blank_frames_are_counted(video, tmp_path):
  out = str(tmp_path / "shards")
  convert.convert([video], out, short_side=48, quality=95, frames_per_shard=8, progress=False)
  manifest, frames = _stored(out, "tour")
  entry = manifest["videos"][0]
  kept = [i for i in range(NUM_FRAMES) if i not in BLANK]
  assert (entry["frames_decoded"], entry["frames_kept"], entry["frames_dropped_blank"],
          entry["frames_skipped"], entry["complete"]) == (NUM_FRAMES, len(kept), len(BLANK), 0, True)
  assert [s["num_records"] for s in entry["shards"]] == [8, 8, 8, 3]
  assert (entry["height"], entry["width"], entry["fps"]) == (48, 64, 10.0)
  assert manifest["options"]["frames_per_shard"] == 8
  assert [f["frame_index"] for f in frames] == kept  # Same frames, same order.
  decoded = _decoded(video)
  for frame in frames:
    pixels = np.asarray(Image.open(io.BytesIO(frame["image/encoded"])))
    errors = [np.abs(pixels.astype(int) - d.astype(int)).mean() for d in decoded]
    assert errors[frame["frame_index"]] < 6.0  # JPEG tolerance (4:2:0 chroma, tiny frames)...
    assert int(np.argmin(errors)) == frame["frame_index"]  # ...and no other frame is closer.
    assert frame["timestamp"] == pytest.approx(frame["frame_index"] / 10, abs=1e-3)
  for shard in entry["shards"]:  # Every shard has its offset index beside it.
    assert os.path.exists(os.path.join(out, shard["file"] + tfrecord.INDEX_SUFFIX))


def test_every_and_short_side(video, tmp_path):
  out = str(tmp_path / "shards")
  convert.convert([video], out, every=2, short_side=24, progress=False)
  manifest, frames = _stored(out, "tour")
  entry = manifest["videos"][0]
  kept = [i for i in range(0, NUM_FRAMES, 2) if i not in BLANK]
  assert [f["frame_index"] for f in frames] == kept
  assert (entry["frames_kept"], entry["frames_dropped_blank"], entry["frames_skipped"]) == (
      len(kept), 2, NUM_FRAMES // 2)
  assert (frames[0]["image/height"], frames[0]["image/width"]) == (24, 32)


def test_rerun_resumes_keeping_completed_shards(video, tmp_path, monkeypatch):
  reference = str(tmp_path / "reference")
  convert.convert([video], reference, frames_per_shard=8, progress=False)
  out = str(tmp_path / "out")
  encode, calls = tfrecord.encode_frame, []

  def interrupted(**kwargs):
    calls.append(1)
    if len(calls) > 19:  # Killed while writing the third shard.
      raise KeyboardInterrupt
    return encode(**kwargs)

  monkeypatch.setattr(tfrecord, "encode_frame", interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.convert([video], out, frames_per_shard=8, progress=False)
  monkeypatch.setattr(tfrecord, "encode_frame", encode)
  assert sorted(os.listdir(out)) == sorted(
      ["manifest.json"] + [f"tour-0000{k}.tfrecord{s}" for k in (0, 1) for s in ("", ".idx")])
  first_shard = os.path.join(out, "tour-00000.tfrecord")
  before = os.stat(first_shard).st_mtime_ns
  manifest = convert.convert([video], out, frames_per_shard=8, progress=False)
  assert os.stat(first_shard).st_mtime_ns == before  # Kept, not rewritten.
  expected = json.load(open(os.path.join(reference, "manifest.json")))
  for key in ("frames_decoded", "frames_kept", "frames_dropped_blank", "complete"):
    assert manifest["videos"][0][key] == expected["videos"][0][key]
  for name in os.listdir(reference):
    if name.endswith(".tfrecord"):
      assert open(os.path.join(out, name), "rb").read() == open(
          os.path.join(reference, name), "rb").read(), name


def test_bad_inputs_give_one_line_errors_and_the_other_videos_are_converted(video, tmp_path,
                                                                             capsys):
  good = str(tmp_path / "good.mp4")
  os.link(video, good)
  missing = str(tmp_path / "missing.mp4")
  text = str(tmp_path / "notes.mp4")
  open(text, "w").write("not a video\n")
  data = open(video, "rb").read()
  truncated = str(tmp_path / "cut.mp4")  # Index at the end: the cut file does not open.
  open(truncated, "wb").write(data[:len(data) // 2])
  faststart = open(_faststart_copy(video, str(tmp_path / "fs.mp4")), "rb").read()
  cut_faststart = str(tmp_path / "cutfs.mp4")  # Opens, but half the frames are gone.
  open(cut_faststart, "wb").write(faststart[:len(faststart) // 2])
  no_frames = str(tmp_path / "noframes.mp4")  # Index only, no frame data.
  open(no_frames, "wb").write(faststart[:faststart.find(b"mdat") + 64])
  out = str(tmp_path / "shards")

  bad = [missing, text, truncated, cut_faststart, no_frames]
  status = convert_cli.main([missing, text, good, truncated, cut_faststart, no_frames, "--out", out,
                         "--no-progress"])
  assert status == 1
  errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert len(errors) == len(bad)
  for path, line in zip(bad, errors):
    assert f"'{path}'" in line
  assert "does not exist" in errors[0] and "not a video" in errors[1]
  assert "truncated" in errors[3] and "0 decodable frames" in errors[4]
  manifest = manifest_lib.load(out)
  done = [v["id"] for v in manifest["videos"] if v["complete"]]
  assert done == ["good"]


def test_output_folder_of_another_dataset_or_options_is_refused(video, tmp_path, capsys):
  out = tmp_path / "other"
  out.mkdir()
  (out / "manifest.json").write_text(json.dumps({"name": "imagenet", "splits": []}))
  assert convert_cli.main([video, "--out", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "manifest.json" in err and "another dataset" in err

  mine = str(tmp_path / "mine")
  assert convert_cli.main([video, "--out", mine, "--no-progress", "--short-side", "32"]) == 0
  capsys.readouterr()
  assert convert_cli.main([video, "--out", mine, "--no-progress", "--short-side", "48"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "other --out folder" in err


def test_rerun_repairs_shards_cut_short_or_failing_a_crc(video, tmp_path):
  out = str(tmp_path / "shards")
  convert.convert([video], out, frames_per_shard=8, progress=False)
  names = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))
  pristine = {n: open(os.path.join(out, n), "rb").read() for n in names}

  def rerun(*flags):
    return convert_cli.main([video, "--out", out, "--frames-per-shard", "8", "--no-progress", *flags])

  os.remove(os.path.join(out, names[0] + tfrecord.INDEX_SUFFIX))  # Index lost: rebuilt.
  with open(os.path.join(out, names[2]), "r+b") as f:  # Cut short: converted again from there.
    f.truncate(len(pristine[names[2]]) - 100)
  assert rerun() == 0
  for name in names:
    assert open(os.path.join(out, name), "rb").read() == pristine[name], name
  assert os.path.exists(os.path.join(out, names[0] + tfrecord.INDEX_SUFFIX))

  damaged = bytearray(pristine[names[1]])
  damaged[200] ^= 0x10  # A flipped bit: same size, so only --verify (every CRC) finds it.
  open(os.path.join(out, names[1]), "wb").write(damaged)
  assert rerun() == 0
  assert open(os.path.join(out, names[1]), "rb").read() == bytes(damaged)
  assert rerun("--verify") == 0
  for name in names:
    assert open(os.path.join(out, name), "rb").read() == pristine[name], name
  manifest = manifest_lib.load(out)
  assert manifest["videos"][0]["complete"]
  assert manifest["videos"][0]["frames_kept"] == NUM_FRAMES - len(BLANK)


@pytest.fixture(scope="module")
def pristine(video, tmp_path_factory):
  """A converted copy of the tour: shards of 8, 8, 8 and 3 frames."""
  out = str(tmp_path_factory.mktemp("pristine") / "shards")
  convert.convert([video], out, frames_per_shard=8, progress=False)
  return out


def _files(folder):
  return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def _set_length(path, record, length, offset_in_header=0):
  """Writes a length field (with a matching CRC) into record `record` of the shard `path`."""
  offsets, _ = tfrecord.build_index(path)
  field = struct.pack("<Q", length)
  with open(path, "r+b") as f:
    f.seek(int(offsets[record]) + offset_in_header)
    f.write(field + struct.pack("<I", tfrecord.masked_crc(field)))


def _flip(path, position):
  blob = bytearray(open(path, "rb").read())
  blob[position] ^= 0x04
  open(path, "wb").write(blob)


def _edit_manifest(folder, edit):
  path = os.path.join(folder, "manifest.json")
  manifest = json.load(open(path))
  edit(manifest["videos"][0])
  open(path, "w").write(json.dumps(manifest))


# name -> (damage(folder), whether a plain re-run (sizes and counts, no CRC) repairs it too, what
# the report line says).
_DAMAGE = {
    "data bit": (lambda d: _flip(f"{d}/tour-00001.tfrecord", 300), False,
                 r"again from '.*tour-00001\.tfrecord' on \(3 shards\): .*bad data CRC in record 0"),
    "length bit": (lambda d: _flip(f"{d}/tour-00001.tfrecord", 2), False,
                   r"tour-00001\.tfrecord' on .*bad length CRC in record 0 at byte 0"),
    "length with its CRC": (lambda d: _set_length(f"{d}/tour-00002.tfrecord", 1, 2**62), False,
                            rf"tour-00002\.tfrecord' on \(2 shards\).*record 1 .*{2**62 + 16}"),
    "cut in a record": (lambda d: os.truncate(f"{d}/tour-00002.tfrecord", 1000), True,
                        r"tour-00002\.tfrecord' on .*cut short"),
    "cut between records": (
        lambda d: os.truncate(f"{d}/tour-00003.tfrecord",
                              int(sum(tfrecord.build_index(f"{d}/tour-00003.tfrecord")[1][:2]))),
        True, r"tour-00003\.tfrecord' on \(1 shard\): the shard holds 2 records, the manifest "
        r"lists 3"),
    "shard missing": (lambda d: os.remove(f"{d}/tour-00001.tfrecord"), True,
                      r"tour-00001\.tfrecord' on \(3 shards\): the shard is missing"),
    "index missing": (lambda d: os.remove(f"{d}/tour-00000.tfrecord.idx"), True,
                      r"rebuilt '.*tour-00000\.tfrecord\.idx': it was missing"),
    "index garbled": (lambda d: open(f"{d}/tour-00000.tfrecord.idx", "a").write("12 x\n"), True,
                      r"rebuilt '.*tour-00000\.tfrecord\.idx': it was damaged \(.*not lines"),
    "index binary": (lambda d: open(f"{d}/tour-00003.tfrecord.idx", "wb").write(bytes(range(256))),
                     True, r"rebuilt '.*tour-00003\.tfrecord\.idx': it was damaged"),
    "index shifted": (  # Consistent with the file's size, but not the records: --verify only.
        lambda d: open(f"{d}/tour-00000.tfrecord.idx", "w").write(
            "".join(f"{o + (i == 1)} {s + (i == 0) - (i == 1)}\n" for i, (o, s) in
                    enumerate(zip(*tfrecord.build_index(f"{d}/tour-00000.tfrecord"))))),
        False, r"rebuilt '.*tour-00000\.tfrecord\.idx': it did not describe the shard's records"),
    "frames in the manifest": (lambda d: _edit_manifest(d, lambda v: v.update(num_frames=400)),
                               True, r"corrected '.*manifest\.json': it listed 400 frames for "
                               r"video 'tour', its shards hold 27"),
    "records in the manifest": (
        lambda d: _edit_manifest(d, lambda v: v["shards"][1].update(num_records=9)), True,
        r"tour-00001\.tfrecord' on \(3 shards\): the shard holds 8 records, the manifest lists 9"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_verify_repairs_every_damage_and_says_what_it_rewrote(video, pristine, tmp_path, capsys,
                                                             damage):
  damage_fn, plain_repairs, line = _DAMAGE[damage]
  expected = _files(pristine)
  out = str(tmp_path / "shards")
  shutil.copytree(pristine, out)
  damage_fn(out)
  args = [video, "--out", out, "--frames-per-shard", "8", "--no-progress"]
  capsys.readouterr()
  for flags in ([], ["--verify"]):
    assert convert_cli.main(args + flags) == 0
    report = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("tour:")]
    if plain_repairs or flags:
      assert _files(out) == expected, flags  # Shards, indexes and manifest as converted.
      assert len(report) == (1 if plain_repairs != bool(flags) else 0), report
      if report:
        assert re.search(line, report[0]), report[0]
  # The training start-up check and every read agree.
  manifest = manifest_lib.load(out)
  source.check_data(out, manifest["videos"])
  _, frames = _stored(out, "tour")
  assert len(frames) == NUM_FRAMES - len(BLANK)


def _make_read_only(folder) -> bool:
  """Makes `folder` read-only, for root too (chattr +i); False where that cannot be done."""
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    return True
  return subprocess.run(["chattr", "+i", str(folder)], capture_output=True,
                        check=False).returncode == 0


def test_unusable_output_folders_are_one_line_errors(video, tmp_path, capsys, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  cases = {str(a_file): "is a file, not a folder", str(a_file / "sub"): "Not a directory"}
  if _make_read_only(read_only):
    cases[str(read_only)] = "cannot hold the shards"
  try:
    for out, message in cases.items():
      assert convert_cli.main([video, "--out", out, "--no-progress"]) == 2
      captured = capsys.readouterr()
      assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
      assert f"--out '{out}'" in captured.err and message in captured.err
  finally:
    if os.geteuid() == 0:
      subprocess.run(["chattr", "-i", str(read_only)], capture_output=True, check=False)
    os.chmod(read_only, 0o755)

  def full(self, data):  # The disk filling up while a shard is written.
    raise OSError(errno.ENOSPC, "No space left on device", self.path)

  monkeypatch.setattr(tfrecord.TFRecordWriter, "write", full)
  out = str(tmp_path / "shards")
  assert convert_cli.main([video, "--out", out, "--no-progress"]) == 2
  captured = capsys.readouterr()
  assert captured.err.count("\n") == 1 and "No space left on device" in captured.err
  assert not [n for n in os.listdir(out) if ".tfrecord" in n]  # Nothing half-written left.
