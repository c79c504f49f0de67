"""Datasets: IDX reading and its error messages, where a dataset is looked for, downloads from a
local HTTP server, and users' own images."""

import functools
import gzip
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_idx_dataset, write_idx
from mnist_vae import data, images

STEMS = list(data.FILES.values())
GZ_NAMES = [stem + ".gz" for stem in STEMS]


def md5_of(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def raise_message(path, excinfo):
    """The DataError's message, checked to name the file."""
    message = str(excinfo.value)
    assert str(path) in message, message
    return message


# ---------------------------------------------------------------- read_idx: good files


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    images_path = write_idx(tmp_path / "images", images, gz=gz)
    labels_path = write_idx(tmp_path / "labels", labels, gz=gz)
    assert (images_path.read_bytes()[:2] == b"\x1f\x8b") == gz
    got_images, got_labels = data.read_idx(images_path), data.read_idx(labels_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_empty_dataset(tmp_path):
    path = write_idx(tmp_path / "none", np.zeros((0, 28, 28), np.uint8))
    assert data.read_idx(path).shape == (0, 28, 28)


# ---------------------------------------------------------------- read_idx: broken files

def idx_bytes(array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()


GOOD = idx_bytes(np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256)

BROKEN = {
    "bad magic": (b"\x01\x02\x08\x03" + GOOD[4:], "magic"),
    "empty file": (b"", "magic"),
    "text file": (b"this is not an IDX file at all\n" * 20, "magic"),
    "float elements": (GOOD[:2] + b"\x0d" + GOOD[3:], "0x0d"),
    "int elements": (GOOD[:2] + b"\x0c" + GOOD[3:], "0x0c"),
    "truncated header": (GOOD[:10], "header is truncated"),
    "zero dimensions": (b"\x00\x00\x08\x00", "header is truncated"),
    "short payload": (GOOD[:-5], "promises 1568 bytes"),
    "long payload": (GOOD + b"\x00" * 3, "holds 1571"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_read_idx_rejects_corrupt_files(tmp_path, case, gz):
    content, needle = BROKEN[case]
    path = tmp_path / ("broken-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path)
    assert needle in raise_message(path, excinfo)


def test_read_idx_truncated_gzip_stream(tmp_path):
    full = write_idx(tmp_path / "full.gz", np.random.default_rng(0).integers(0, 256, (50, 28, 28)))
    raw = full.read_bytes()
    path = tmp_path / "half-images-idx3-ubyte.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path)
    assert "truncated" in raise_message(path, excinfo)


def test_read_idx_garbage_with_gzip_magic(tmp_path):
    path = tmp_path / "fake.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path)
    raise_message(path, excinfo)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nowhere-idx1-ubyte"
    with pytest.raises(data.DataError) as excinfo:
        data.read_idx(path)
    raise_message(path, excinfo)


# ---------------------------------------------------------------- pairs of files, through load_dataset

def replace_file(folder, stem, array):
    for old in (folder / stem, folder / (stem + ".gz")):
        old.unlink(missing_ok=True)
    return write_idx(folder / (stem + ".gz"), array)


@pytest.mark.parametrize("case", ["count mismatch", "label above 9", "wrong image shape", "flat images",
                                  "labels not 1-D"])
def test_load_dataset_rejects_mismatched_files(tmp_path, case):
    folder = make_idx_dataset(tmp_path / "d", n_train=20, n_test=10)
    rng = np.random.default_rng(0)
    if case == "count mismatch":
        bad = replace_file(folder, "t10k-labels-idx1-ubyte", rng.integers(0, 10, 9))
        needles = ["10 images", "9 labels", str(folder / "t10k-images-idx3-ubyte.gz")]
    elif case == "label above 9":
        labels = rng.integers(0, 10, 20)
        labels[5] = 12
        bad = replace_file(folder, "train-labels-idx1-ubyte", labels)
        needles = ["label 12"]
    elif case == "wrong image shape":
        bad = replace_file(folder, "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 27)))
        needles = ["(20, 28, 27)"]
    elif case == "flat images":
        bad = replace_file(folder, "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 784)))
        needles = ["(10, 784)"]
    else:
        bad = replace_file(folder, "t10k-labels-idx1-ubyte", rng.integers(0, 10, (10, 2)))
        needles = ["(10, 2)"]
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=folder, log=lambda line: None)
    message = raise_message(bad, excinfo)
    for needle in needles:
        assert needle in message, message


def test_load_dataset_reads_raw_files_and_reports_source(tmp_path):
    folder = make_idx_dataset(tmp_path / "raw", n_train=30, n_test=12, gz=False)
    logs = []
    dataset = data.load_dataset("fashion-mnist", data_dir=folder, log=logs.append)
    assert dataset.train_images.shape == (30, 28, 28) and dataset.test_labels.shape == (12,)
    assert dataset.classes[9] == "Ankle boot"
    assert str(folder) in dataset.source and "--data_dir" in dataset.source
    assert logs == []  # nothing to download, nothing to say


# ---------------------------------------------------------------- where a dataset is looked for

@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty system folder, and the paths of the user cache and of the system folder."""
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", system)
    cache = tmp_path / "xdg-cache" / "mnist-vae"
    return {"system": system, "cache": cache}


def no_download(*args, **kwargs):
    raise AssertionError("find_dataset tried to download")


def test_search_order(tmp_path, places, monkeypatch):
    """--data_dir, then the user cache, then the system folder, then the bundled copy, then a download."""
    monkeypatch.setattr(data, "download_dataset", no_download)
    name = "mnist"
    own = make_idx_dataset(tmp_path / "own", n_train=11, n_test=3)
    cache = make_idx_dataset(places["cache"] / name, n_train=12, n_test=3)
    system = make_idx_dataset(places["system"] / name, n_train=13, n_test=3)
    bundled = data.bundled_dir(name)
    assert bundled is not None and bundled.is_dir()

    def found(**kwargs):
        folder, source = data.find_dataset(name, log=lambda line: None, **kwargs)
        return Path(folder), source

    folder, source = found(data_dir=own)
    assert folder == own and source == f"--data_dir {own}"
    assert len(data.load_dataset(name, data_dir=own).train_labels) == 11

    folder, source = found()
    assert folder == cache and source.startswith("user cache") and str(cache) in source
    assert len(data.load_dataset(name, log=lambda line: None).train_labels) == 12

    (cache / "train-labels-idx1-ubyte.gz").unlink()  # an incomplete cache is passed over
    folder, source = found()
    assert folder == system and source.startswith("system folder") and str(system) in source
    assert len(data.load_dataset(name, log=lambda line: None).train_labels) == 13

    for path in system.iterdir():
        path.unlink()
    folder, source = found()
    assert folder == bundled and source.startswith("copy bundled") and str(bundled) in source

    monkeypatch.setattr(data, "bundled_dir", lambda name: None)
    with pytest.raises(data.DataError, match="--data_dir"):
        found(download=False)
    with pytest.raises(AssertionError, match="tried to download"):
        found()


def test_system_folder_found_for_fashion_mnist(tmp_path, places, monkeypatch):
    monkeypatch.setattr(data, "download_dataset", no_download)
    system = make_idx_dataset(places["system"] / "fashion-mnist", n_train=14, n_test=4, gz=False)
    folder, source = data.find_dataset("fashion-mnist")
    assert Path(folder) == system and "system folder" in source
    # MNIST is not in that system folder: it falls through to the bundled copy.
    folder, source = data.find_dataset("mnist")
    assert Path(folder) == data.bundled_dir("mnist")


def test_data_dir_wins_even_when_incomplete(tmp_path, places, monkeypatch):
    """A --data_dir lacking files is an error naming them, not a silent fall back to other places."""
    monkeypatch.setattr(data, "download_dataset", no_download)
    make_idx_dataset(places["cache"] / "mnist")
    folder = make_idx_dataset(tmp_path / "partial")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as excinfo:
        data.find_dataset("mnist", data_dir=folder)
    message = raise_message(folder, excinfo)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "train-images-idx3-ubyte" not in message and "t10k-labels-idx1-ubyte" not in message
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("mnist", data_dir=tmp_path / "does-not-exist")
    assert all(stem in str(excinfo.value) for stem in STEMS)


def test_unknown_dataset():
    with pytest.raises(data.DataError, match="cifar"):
        data.find_dataset("cifar")


def test_fashion_mnist_not_bundled_mnist_is():
    assert data.bundled_dir("fashion-mnist") is None
    folder = data.bundled_dir("mnist")
    assert folder is not None
    assert sorted(path.name for path in folder.glob("*.gz")) == sorted(GZ_NAMES)
    images = data.read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = data.read_idx(folder / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert data.read_idx(folder / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    test_labels = data.read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    # The published class counts of MNIST.
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------- downloads from a local server

class Server:
    """A local HTTP server over a folder; records the paths asked for."""

    def __init__(self, root):
        self.root, self.requests = Path(root), []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, folder):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{folder}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    """mirror1/ and mirror2/ both hold a small dataset; md5 is that of the files in mirror2."""
    root = tmp_path / "www"
    make_idx_dataset(root / "mirror1", n_train=40, n_test=10, seed=1)
    make_idx_dataset(root / "mirror2", n_train=40, n_test=10, seed=2)
    running = Server(root)
    running.md5 = {name: md5_of(root / "mirror2" / name) for name in GZ_NAMES}
    running.root = root
    yield running
    running.close()


@pytest.fixture
def spec(server, monkeypatch):
    """Make mnist's and fashion-mnist's published checksums those of the local files."""
    for name in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(data.DATASETS, name, {**data.DATASETS[name], "md5": dict(server.md5),
                                                  "mirrors": [server.url("mirror2")]})
    return data.DATASETS


@pytest.fixture
def dead_url():
    """A URL on a local port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def assert_good_download(folder, server):
    assert sorted(path.name for path in Path(folder).iterdir()) == sorted(GZ_NAMES)  # no leftovers
    for name in GZ_NAMES:
        assert md5_of(Path(folder) / name) == server.md5[name]
        assert (Path(folder) / name).read_bytes() == (server.root / "mirror2" / name).read_bytes()


def test_download_success(tmp_path, server, spec):
    target, logs = tmp_path / "target", []
    data.download_dataset("mnist", target, mirrors=[server.url("mirror2")], timeout=5, log=logs.append)
    assert_good_download(target, server)
    assert logs == [f"downloading {server.url('mirror2')}{name}" for name in GZ_NAMES]
    dataset = data.load_dataset("mnist", data_dir=target)
    assert dataset.train_images.shape == (40, 28, 28) and dataset.test_labels.shape == (10,)


def test_checksum_mismatch_falls_back_to_next_mirror(tmp_path, server, spec):
    target, logs = tmp_path / "target", []
    mirrors = [server.url("mirror1"), server.url("mirror2")]
    data.download_dataset("mnist", target, mirrors=mirrors, timeout=5, log=logs.append)
    assert_good_download(target, server)
    assert [f"/mirror1/{name}" for name in GZ_NAMES] == server.requests[0::2]
    assert [f"/mirror2/{name}" for name in GZ_NAMES] == server.requests[1::2]
    assert len(logs) == 8


@pytest.mark.parametrize("first", ["nothing listening", "404", "not HTTP"])
def test_dead_mirror_falls_back_to_next(tmp_path, server, spec, dead_url, first):
    if first == "nothing listening":
        url = dead_url
    elif first == "404":
        url = server.url("no-such-folder")
    else:
        url = garbage_server()
    target = tmp_path / "target"
    data.download_dataset("mnist", target, mirrors=[url, server.url("mirror2")], timeout=5, log=lambda line: None)
    assert_good_download(target, server)


def garbage_server():
    """A local port that answers every connection with something that is not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        with listener:
            for _ in range(len(GZ_NAMES)):
                connection, _ = listener.accept()
                with connection:
                    connection.recv(4096)
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2 hello\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/"


def test_silent_mirror_times_out_and_falls_back(tmp_path, server, spec):
    """A server that accepts connections but never answers costs `timeout` per file, then the next mirror."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        target, logs = tmp_path / "target", []
        data.download_dataset("mnist", target, mirrors=[url, server.url("mirror2")], timeout=0.3, log=logs.append)
    assert_good_download(target, server)
    assert len(logs) == 8


def test_all_mirrors_bad(tmp_path, server, spec, dead_url):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    mirrors = [server.url("mirror1"), dead_url, server.url("no-such-folder")]
    with pytest.raises(data.DataError) as excinfo:
        data.download_dataset("mnist", target, mirrors=mirrors, timeout=5, log=lambda line: None)
    message = str(excinfo.value)
    assert "could not download mnist" in message
    assert f"{server.url('mirror1')}{GZ_NAMES[0]}: MD5" in message
    assert f"{dead_url}{GZ_NAMES[0]}: unreachable" in message
    assert f"{server.url('no-such-folder')}{GZ_NAMES[0]}: HTTP 404" in message
    assert "--data_dir" in message
    assert "\n" not in message
    # Nothing left behind: no temporary files, no file with the wrong checksum.
    assert [path.name for path in target.iterdir()] == ["notes.txt"]
    assert not list(target.glob("*.part")) and not list(target.glob(".*"))


def test_failure_on_a_later_file_keeps_the_good_ones(tmp_path, server, spec):
    (server.root / "mirror2" / "t10k-images-idx3-ubyte.gz").unlink()
    target = tmp_path / "target"
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: HTTP 404"):
        data.download_dataset("mnist", target, mirrors=[server.url("mirror2")], timeout=5, log=lambda line: None)
    assert sorted(path.name for path in target.iterdir()) == sorted(GZ_NAMES[:2])
    for name in GZ_NAMES[:2]:
        assert md5_of(target / name) == server.md5[name]


def test_present_files_are_not_downloaded_again(tmp_path, server, spec):
    target = tmp_path / "target"
    target.mkdir()
    good, wrong = GZ_NAMES[0], GZ_NAMES[1]
    (target / good).write_bytes((server.root / "mirror2" / good).read_bytes())
    (target / wrong).write_bytes((server.root / "mirror1" / wrong).read_bytes())  # checksum wrong
    before = (target / good).stat().st_mtime_ns
    data.download_dataset("mnist", target, mirrors=[server.url("mirror2")], timeout=5, log=lambda line: None)
    assert_good_download(target, server)
    assert server.requests == [f"/mirror2/{name}" for name in GZ_NAMES[1:]]
    assert (target / good).stat().st_mtime_ns == before

    server.requests.clear()
    data.download_dataset("mnist", target, mirrors=[server.url("mirror2")], timeout=5, log=lambda line: None)
    assert server.requests == []


def test_find_dataset_downloads_into_user_cache(tmp_path, server, spec, places, monkeypatch):
    """Fashion-MNIST is not bundled: with no copy on the machine it is downloaded into the cache."""
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 5)
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "mirrors", [server.url("mirror1"), server.url("mirror2")])
    logs = []
    dataset = data.load_dataset("fashion-mnist", log=logs.append)
    cache = places["cache"] / "fashion-mnist"
    assert dataset.source == f"downloaded to {cache}"
    assert_good_download(cache, server)
    assert dataset.train_images.shape == (40, 28, 28)
    assert any(server.url("mirror1") in line for line in logs) and any(server.url("mirror2") in line for line in logs)
    assert all(line.startswith("downloading http://127.0.0.1:") for line in logs)

    # The second time, the cache answers: no request.
    server.requests.clear()
    logs.clear()
    again = data.load_dataset("fashion-mnist", log=logs.append)
    assert again.source == f"user cache {cache}" and logs == [] and server.requests == []
    np.testing.assert_array_equal(again.train_images, dataset.train_images)


def test_find_dataset_download_fails_cleanly(tmp_path, server, spec, places, monkeypatch, dead_url):
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 5)
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "mirrors", [dead_url, server.url("mirror1")])
    with pytest.raises(data.DataError) as excinfo:
        data.load_dataset("fashion-mnist", log=lambda line: None)
    message = str(excinfo.value)
    assert "fashion-mnist" in message and "unreachable" in message and "MD5" in message
    assert "--data_dir" in message
    cache = places["cache"] / "fashion-mnist"
    assert not cache.exists() or list(cache.iterdir()) == []


# ---------------------------------------------------------------- users' own images

def stroke_mask(height=60, width=90):
    """A '0'-like ring of ink, left of the canvas centre, on a `height` x `width` canvas."""
    ys, xs = np.indices((height, width))
    cy, cx, ry, rx = height * 0.5, width * 0.33, height * 0.37, height * 0.24
    r = np.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
    return (r > 0.75) & (r < 1.0)


def centre_of_mass(image):
    ys, xs = np.indices(image.shape)
    return (ys * image).sum() / image.sum(), (xs * image).sum() / image.sum()


def test_user_image_light_background_rgb(tmp_path):
    mask = stroke_mask()
    rgb = np.full(mask.shape + (3,), (250, 245, 235), dtype=np.uint8)  # paper
    rgb[mask] = (20, 25, 40)  # ink
    path = tmp_path / "seven.png"
    Image.fromarray(rgb, "RGB").save(path)
    pixels = images.load_user_image(path)
    assert pixels.shape == (784,) and pixels.dtype == np.float32
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.max() > 0.9
    image = pixels.reshape(28, 28)
    border = np.concatenate([image[:3].ravel(), image[-3:].ravel(), image[:, :3].ravel(), image[:, -3:].ravel()])
    assert border.max() < 0.05  # dark background
    assert (image > 0.5).mean() < 0.4  # a stroke, not a filled page
    cy, cx = centre_of_mass(image)
    assert abs(cy - 14) < 1.5 and abs(cx - 14) < 1.5
    # Fitted in a 20x20 box like MNIST digits: the ink spans about 20 pixels down.
    rows = np.nonzero(image.max(axis=1) > 0.2)[0]
    assert 17 <= rows[-1] - rows[0] + 1 <= 21


def test_user_image_dark_background_is_not_inverted(tmp_path):
    mask = stroke_mask()
    light = np.where(mask, 20, 250).astype(np.uint8)
    dark = np.where(mask, 230, 0).astype(np.uint8)
    Image.fromarray(np.stack([light] * 3, axis=-1), "RGB").save(tmp_path / "light.png")
    Image.fromarray(dark, "L").save(tmp_path / "dark.png")
    from_dark = images.load_user_image(tmp_path / "dark.png").reshape(28, 28)
    from_light = images.load_user_image(tmp_path / "light.png").reshape(28, 28)
    assert from_dark[0].max() < 0.05 and from_dark[-1].max() < 0.05
    assert (from_dark > 0.5).mean() < 0.4
    np.testing.assert_allclose(from_dark, from_light, atol=0.02)


def test_user_image_jpeg_of_another_size(tmp_path):
    mask = stroke_mask(height=200, width=120)
    path = tmp_path / "digit.jpg"
    Image.fromarray(np.where(mask, 0, 255).astype(np.uint8), "L").save(path, quality=90)
    image = images.load_user_image(path).reshape(28, 28)
    cy, cx = centre_of_mass(image)
    assert abs(cy - 14) < 1.5 and abs(cx - 14) < 1.5
    assert image[0].max() < 0.05


@pytest.mark.parametrize("case", ["text file", "missing", "blank white", "blank grey", "blank black"])
def test_user_image_errors(tmp_path, case):
    path = tmp_path / "digit.png"
    if case == "text file":
        path.write_text("not a picture\n")
    elif case.startswith("blank"):
        value = {"blank white": 255, "blank grey": 128, "blank black": 0}[case]
        Image.new("RGB", (40, 30), (value, value, value)).save(path)
    with pytest.raises(data.DataError) as excinfo:
        images.load_user_image(path)
    message = raise_message(path, excinfo)
    if case.startswith("blank"):
        assert "blank" in message
