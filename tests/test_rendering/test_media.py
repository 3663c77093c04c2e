"""Conditioning media: URI checks against the media roots, and safe image and video loading.

Every file here is built in code in a temp folder (see media_corpus.py).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import media_corpus as corpus
import numpy as np
import pytest
from helpers import REPO

from rendering.contract import MediaInput, MediaSpec
from rendering.media import MediaError, reader
from rendering.media import videos as media
from rendering.media.images import load_image
from rendering.media.uris import check_uri
from rendering.media.videos import load_video



def expect_error(fn, *args, contains: tuple[str, ...] = (), absent: tuple[str, ...] = ()) -> MediaError:
    """Call ``fn``; it must raise MediaError with a one-line message holding each of ``contains``."""
    with pytest.raises(MediaError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) <= 300, message
    assert "Traceback" not in message, message
    for part in contains:
        assert part.lower() in message.lower(), f"{part!r} not in {message!r}"
    for part in absent:
        assert part not in message, f"{part!r} leaked into {message!r}"
    return info.value


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def near(pixel, expected, tolerance=6) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    return folder


def spec_for(root, **overrides) -> MediaSpec:
    return MediaSpec(roots=(str(root),), **overrides)


# ----------------------------------------------------------------------------- check_uri


@pytest.fixture
def tree(tmp_path):
    """media/ with a file, links in and out; outside/ with a secret; mediaEVIL/ beside media/."""
    media_dir = tmp_path / "media"
    (media_dir / "sub").mkdir(parents=True)
    (media_dir / "a.png").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"secret")
    (tmp_path / "mediaEVIL").mkdir()
    (tmp_path / "mediaEVIL" / "x.png").write_bytes(b"x")
    corpus.symlink(media_dir / "link-out.png", tmp_path / "outside" / "secret.png")
    corpus.symlink(media_dir / "dir-out", tmp_path / "outside")
    corpus.symlink(media_dir / "link-in.png", media_dir / "a.png")
    corpus.symlink(tmp_path / "alias", media_dir)  # a root given through a link
    return tmp_path


LOCAL_ALLOWED = [
    ("{t}/media/a.png", "{t}/media/a.png"),
    ("file://{t}/media/a.png", "{t}/media/a.png"),
    ("file://localhost{t}/media/a.png", "{t}/media/a.png"),
    ("file:{t}/media/a.png", "{t}/media/a.png"),
    ("{t}/media/sub/../a.png", "{t}/media/a.png"),
    ("{t}/media/link-in.png", "{t}/media/a.png"),
    ("{t}/media//sub/b.png", "{t}/media/sub/b.png"),
    ("{t}/alias/a.png", "{t}/media/a.png"),
]


@pytest.mark.parametrize("uri,expected", LOCAL_ALLOWED)
@pytest.mark.parametrize("root_form", ["{t}/media", "{t}/media/", "file://{t}/media", "{t}/alias"])
def test_check_uri_allows_local_paths_under_the_root(tree, uri, expected, root_form):
    t = os.path.realpath(tree)
    assert check_uri(uri.format(t=t), (root_form.format(t=t),)) == expected.format(t=t)


LOCAL_REFUSED = [
    ("/etc/passwd", "outside the media roots"),
    ("file:///etc/passwd", "outside the media roots"),
    ("{t}/media/../outside/secret.png", "outside the media roots"),
    ("{t}/media/sub/../../outside/secret.png", "outside the media roots"),
    ("{t}/media/link-out.png", "outside the media roots"),
    ("{t}/media/dir-out/secret.png", "outside the media roots"),
    ("{t}/mediaEVIL/x.png", "outside the media roots"),
    ("{t}/media", "outside the media roots"),  # the root itself is a folder, not media
    ("{t}/media/", "outside the media roots"),
    ("file://otherhost{t}/media/a.png", "another host"),
    ("media/a.png", "not an absolute path"),
    ("file:media/a.png", "not an absolute path"),
    ("{t}/media/a\x00.png", "NUL byte"),
    ("{t}/media/a\n.png", "control characters"),
    ("", "empty"),
    ("   ", "empty"),
    ("ftp://host/{t}/media/a.png", "scheme 'ftp' is not allowed"),
    ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data' is not allowed"),
    ("gopher://127.0.0.1:70/_x", "scheme 'gopher' is not allowed"),
    ("C:\\media\\a.png", "scheme 'c' is not allowed"),
    ("simplecache::file://{t}/media/a.png", "chains filesystems"),
    ("{t}/media/a.png::file:///etc/passwd", "chains filesystems"),
]


@pytest.mark.parametrize("uri,message", LOCAL_REFUSED)
def test_check_uri_refuses_escapes_and_strange_uris(tree, uri, message):
    t = os.path.realpath(tree)
    expect_error(check_uri, uri.format(t=t), (f"{t}/media",), contains=(message,))


REMOTE_ROOTS = ("s3://bucket/prefix", "gs://pictures/in/", "memory://media",
                "https://cdn.example.com/media/", "http://127.0.0.1:8080/m")
REMOTE_ALLOWED = [
    ("s3://bucket/prefix/x.png", "s3://bucket/prefix/x.png"),
    ("S3://bucket/prefix/deep/er/x.png", "s3://bucket/prefix/deep/er/x.png"),
    ("gs://pictures/in/x.png", "gs://pictures/in/x.png"),
    ("memory://media/x.png", "memory://media/x.png"),
    ("memory:///media/x.png", "memory://media/x.png"),
    ("https://cdn.example.com/media/x.png", "https://cdn.example.com/media/x.png"),
    ("https://CDN.Example.com:443/media/x.png?X-Sig=abc", "https://cdn.example.com/media/x.png?X-Sig=abc"),
    ("https://cdn.example.com/media/a%20b.png", "https://cdn.example.com/media/a%20b.png"),
    ("http://127.0.0.1:8080/m/x.png", "http://127.0.0.1:8080/m/x.png"),
]


@pytest.mark.parametrize("uri,expected", REMOTE_ALLOWED)
def test_check_uri_allows_object_store_and_http_uris_under_a_root(uri, expected):
    assert check_uri(uri, REMOTE_ROOTS) == expected


REMOTE_REFUSED = [
    ("s3://bucket/prefixEVIL/x.png", "outside the media roots"),
    ("s3://bucket/other/x.png", "outside the media roots"),
    ("s3://other/prefix/x.png", "outside the media roots"),
    ("s3a://bucket/prefix/x.png", "outside the media roots"),  # another scheme: no root of its own
    ("s3://bucket/prefix", "outside the media roots"),
    ("s3://bucket/prefix/../secret/x.png", "'..'"),
    ("s3://bucket/prefix/./x.png", "'.'"),
    ("s3://bucket/prefix//x.png", "empty path segment"),
    ("s3://bucket/prefix/x.png?versionId=1", "query or fragment"),
    ("s3:bucket/prefix/x.png", "malformed"),
    ("gs://pictures/x.png", "outside the media roots"),
    ("memory://other/x.png", "outside the media roots"),
    ("memory://media/../x.png", "'..'"),
    ("http://cdn.example.com/media/x.png", "outside the media roots"),  # http is not https
    ("https://cdn.example.com/mediaEVIL/x.png", "outside the media roots"),
    ("https://cdn.example.com/x.png", "outside the media roots"),
    ("https://evil.example.com/media/x.png", "outside the media roots"),
    ("https://cdn.example.com.evil.io/media/x.png", "outside the media roots"),
    ("https://cdn.example.com:8443/media/x.png", "outside the media roots"),
    ("https://cdn.example.com/media/../admin/x.png", "'..'"),
    ("https://cdn.example.com/media/%2e%2e/admin/x.png", "'..'"),
    ("https://cdn.example.com/media/..%2fadmin/x.png", "encoded or backslash"),
    ("https://cdn.example.com/media\\..\\admin/x.png", "encoded or backslash"),
    ("https://cdn.example.com/media/x.png#frag", "fragment"),
    ("https://cdn.example.com:99999/media/x.png", "not a valid URL"),
    ("https:///media/x.png", "no host"),
    ("http://127.0.0.1:9/m/x.png", "outside the media roots"),
    ("http://127.0.0.1:8080/m/", "folder"),
    ("ftp://cdn.example.com/media/x.png", "scheme 'ftp' is not allowed"),
]


@pytest.mark.parametrize("uri,message", REMOTE_REFUSED)
def test_check_uri_refuses_remote_uris_off_the_roots(uri, message):
    expect_error(check_uri, uri, REMOTE_ROOTS, contains=(message,))


CREDENTIALS = [
    "s3://AKIAROWKEY:rowSecretValue123@bucket/prefix/x.png",
    "s3://AKIAROWKEY:row/Secret/Value123@bucket/prefix/x.png",
    "s3://AKIAROWKEY:rowSecretValue123/bucket/prefix/x.png",
    "https://user:rowSecretValue123@cdn.example.com/media/x.png",
    "https://cdn.example.com@evil.example.com/media/x.png?rowSecretValue123",
    "ftp://user:rowSecretValue123@ftp.example.com/x.png",
    "s3:AKIAROWKEY:rowSecretValue123@bucket/prefix/x.png",
]


@pytest.mark.parametrize("uri", CREDENTIALS)
def test_uris_with_credentials_are_refused_and_the_secret_never_echoed(uri):
    error = expect_error(check_uri, uri, REMOTE_ROOTS, absent=("rowSecretValue123", "Secret"))
    if "://" in uri and "@" in uri.split("/")[2]:
        assert "credentials" in str(error)


def test_a_secret_in_a_query_string_is_not_echoed():
    error = expect_error(check_uri, "https://other.example.com/x.png?X-Amz-Signature=rowSecret",
                         REMOTE_ROOTS, contains=("outside",))
    assert "rowSecret" not in str(error)


def test_without_roots_nothing_is_allowed(tree):
    expect_error(check_uri, f"{tree}/media/a.png", (), contains=("no media roots",))


def test_check_uri_opens_nothing(tree, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check_uri opened something")

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr("builtins.open", refuse)
    t = os.path.realpath(tree)
    assert check_uri(f"{t}/media/a.png", (f"{t}/media",)) == f"{t}/media/a.png"
    assert check_uri("s3://bucket/prefix/x.png", REMOTE_ROOTS) == "s3://bucket/prefix/x.png"
    expect_error(check_uri, f"{t}/media/link-out.png", (f"{t}/media",), contains=("outside",))


def test_importing_the_module_loads_neither_pil_nor_numpy():
    code = ("import sys, rendering.media\n"
            "heavy = [m for m in ('PIL', 'numpy', 'fsspec', 's3fs', 'torch') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- reading


def test_media_outside_the_roots_is_refused_unread(root, tmp_path, monkeypatch):
    outside = corpus.good_png(tmp_path / "outside")
    link = corpus.symlink(root / "innocent.png", outside)
    monkeypatch.setattr(reader, "_fetch", lambda *a: pytest.fail("read before the check"))
    for uri in (outside, link, f"{root}/../outside/good.png"):
        expect_error(load_image, MediaInput(uri=uri), spec_for(root), 8, 8, contains=("outside",))
        expect_error(load_video, MediaInput(uri=uri), spec_for(root), 1, 8, 8, contains=("outside",))


def test_missing_folder_and_non_regular_files_fail_cleanly(root):
    (root / "folder.png").mkdir()
    os.mkfifo(root / "pipe.png")  # opening a FIFO for reading would block forever
    spec = spec_for(root)
    expect_error(load_image, MediaInput(uri=f"{root}/missing.png"), spec, 8, 8, contains=("not found",))
    expect_error(load_image, MediaInput(uri=f"{root}/folder.png"), spec, 8, 8, contains=("folder",))
    expect_error(load_image, MediaInput(uri=f"{root}/pipe.png"), spec, 8, 8,
                 contains=("not a regular file",))


def test_files_over_max_bytes_are_refused(root):
    path = corpus.oversized_png(root, at_least=20_000)
    assert os.path.getsize(path) > 20_000
    expect_error(load_image, MediaInput(uri=path), spec_for(root, max_bytes=10_000), 8, 8,
                 contains=("over limits.max_media_bytes (10000)",))
    expect_error(load_video, MediaInput(uri=path), spec_for(root, max_bytes=10_000), 1, 8, 8,
                 contains=("limits.max_media_bytes",))
    image, _ = load_image(MediaInput(uri=path), spec_for(root, max_bytes=os.path.getsize(path)), 8, 8)
    assert image.size == (8, 8)


class _Endless(io.RawIOBase):
    """A stream of zeros that counts what was read from it."""

    def __init__(self):
        self.read_bytes = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = b"\0" * len(buffer)
        self.read_bytes += len(buffer)
        return len(buffer)


def test_reading_stops_after_max_bytes_plus_one_when_the_size_is_unknown(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    stream = _Endless()
    monkeypatch.setattr(MemoryFileSystem, "info", lambda self, path, **kw: {"name": path, "type": "file"})
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda self, path, *a, **kw: stream)
    spec = MediaSpec(roots=("memory://endless",), max_bytes=5000)
    expect_error(load_image, MediaInput(uri="memory://endless/x.png"), spec, 8, 8,
                 contains=("over limits.max_media_bytes (5000",))
    assert 0 < stream.read_bytes <= 5001


def test_memory_filesystem_media_is_read_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    data = corpus.png_bytes(corpus.halves((64, 32)))
    fs.pipe_file("/reelfarm-media-test/in/x.png", data)
    try:
        spec = MediaSpec(roots=("memory://reelfarm-media-test/in",))
        image, digest = load_image(MediaInput(uri="memory://reelfarm-media-test/in/x.png"), spec, 64, 32)
        assert image.size == (64, 32) and digest == hashlib.sha256(data).hexdigest()
        expect_error(load_image, MediaInput(uri="memory://reelfarm-media-test/other.png"), spec, 8, 8,
                     contains=("outside",))
        expect_error(load_image, MediaInput(uri="memory://reelfarm-media-test/in/none.png"), spec,
                     8, 8, contains=("not found",))
    finally:
        fs.rm("/reelfarm-media-test", recursive=True)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www that logs request paths and redirects /media/moved*."""
    www = tmp_path / "www"
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args):
            pass

        def _redirect(self) -> bool:
            requests.append(self.path)
            if not self.path.startswith("/media/moved"):
                return False
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/private/secret.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_HEAD(self):
            if not self._redirect():
                super().do_HEAD()

        def do_GET(self):
            if not self._redirect():
                super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{port}", requests
    server.shutdown()
    server.server_close()


def test_http_media_under_a_root_loads_and_redirects_are_not_followed(http_server):
    www, base, requests = http_server
    path = corpus.good_png(www / "media")
    corpus.good_png(www / "private", name="secret.png")
    spec = MediaSpec(roots=(f"{base}/media/",))
    image, digest = load_image(MediaInput(uri=f"{base}/media/good.png"), spec, 32, 16)
    assert image.size == (32, 16) and digest == sha(path)
    expect_error(load_image, MediaInput(uri=f"{base}/media/moved.png?sig=rowSecret"), spec, 8, 8,
                 absent=("rowSecret",))
    expect_error(load_image, MediaInput(uri=f"{base}/media/gone.png?sig=rowSecret"), spec, 8, 8,
                 contains=("not found",), absent=("rowSecret",))
    expect_error(load_image, MediaInput(uri=f"{base}/private/secret.png"), spec, 8, 8,
                 contains=("outside",))
    assert requests and not [r for r in requests if r.startswith("/private")]


def test_inline_bytes_load_hash_and_obey_the_byte_limit(root):
    data = corpus.png_bytes(corpus.halves((64, 32)))
    digest = hashlib.sha256(data).hexdigest()
    image, got = load_image(MediaInput(data=data), MediaSpec(), 64, 32)  # no roots needed
    assert got == digest and image.size == (64, 32)
    assert load_image(MediaInput(data=data, sha256=digest), MediaSpec(), 8, 8)[1] == digest
    expect_error(load_image, MediaInput(data=data, sha256="0" * 64), MediaSpec(), 8, 8,
                 contains=("do not match their sha256",))
    expect_error(load_image, MediaInput(data=data), MediaSpec(max_bytes=len(data) - 1), 8, 8,
                 contains=("inline media", "limits.max_media_bytes"))
    expect_error(load_image, MediaInput(data=b"not an image"), MediaSpec(), 8, 8,
                 contains=("inline media", "not an image"))
    expect_error(load_image, MediaInput(), MediaSpec(), 8, 8, contains=("neither a URI nor inline",))


# ----------------------------------------------------------------------------- images


def test_good_png_and_jpeg_load_as_rgb_of_the_exact_size_with_the_source_hash(root):
    for path in (corpus.good_png(root), corpus.good_jpeg(root)):
        image, digest = load_image(MediaInput(uri=path), spec_for(root), 64, 32)
        assert (image.mode, image.size) == ("RGB", (64, 32))
        assert digest == sha(path)
        assert near(image.getpixel((4, 16)), corpus.RED) and near(image.getpixel((60, 16)), corpus.BLUE)
        assert load_image(MediaInput(uri=path, sha256=digest), spec_for(root), 8, 8)[1] == digest
        expect_error(load_image, MediaInput(uri=path, sha256="0" * 64), spec_for(root), 8, 8,
                     contains=("does not match its expected sha256",))


MODES = [  # builder, expected pixel on the left half, on the right half
    (corpus.png16, (156, 156, 156), (156, 156, 156)),  # 40000 / 257, not clipped to white
    (corpus.cmyk_jpeg, (200, 60, 20), (200, 60, 20)),
    (corpus.grey_png, (77, 77, 77), (77, 77, 77)),
    (corpus.palette_png_transparent, (0, 0, 0), corpus.GREEN),  # transparent → black
    (corpus.rgba_png, (0, 0, 0), corpus.BLUE),
    (corpus.grey_alpha_png, (0, 0, 0), (200, 200, 200)),
]


@pytest.mark.parametrize("build,left,right", MODES, ids=[m[0].__name__ for m in MODES])
def test_any_mode_becomes_rgb_with_sane_values(root, build, left, right):
    path = build(root)
    image, _ = load_image(MediaInput(uri=path), spec_for(root, resize="error"), 40, 30)
    assert (image.mode, image.size) == ("RGB", (40, 30))
    assert near(image.getpixel((3, 15)), left), image.getpixel((3, 15))
    assert near(image.getpixel((36, 15)), right), image.getpixel((36, 15))


def test_exif_orientation_is_applied(root):
    path = corpus.exif_rotated_jpeg(root)  # stored 64x32, red left; turned 90° clockwise
    image, _ = load_image(MediaInput(uri=path), spec_for(root, resize="error"), 32, 64)
    assert image.size == (32, 64)
    assert near(image.getpixel((16, 4)), corpus.RED, 12) and near(image.getpixel((16, 60)), corpus.BLUE, 12)


def test_resize_crop_covers_and_centre_crops(root):
    path = corpus.good_png(root, size=(64, 32))  # red | blue
    square, _ = load_image(MediaInput(uri=path), spec_for(root, resize="crop"), 32, 32)
    assert square.size == (32, 32)
    assert near(square.getpixel((2, 2)), corpus.RED) and near(square.getpixel((29, 29)), corpus.BLUE)
    tall, _ = load_image(MediaInput(uri=path), spec_for(root), 16, 64)  # crop is the default
    assert tall.size == (16, 64)
    assert near(tall.getpixel((1, 32)), corpus.RED) and near(tall.getpixel((14, 32)), corpus.BLUE)
    assert not np.any(np.asarray(tall).sum(axis=2) == 0), "crop must never pad"


def test_resize_fit_scales_inside_and_pads_black(root):
    path = corpus.good_png(root, size=(64, 32))
    square, _ = load_image(MediaInput(uri=path), spec_for(root, resize="fit"), 32, 32)
    assert square.size == (32, 32)
    pixels = np.asarray(square)
    assert (pixels[:7] == 0).all() and (pixels[-7:] == 0).all(), "black bands above and below"
    assert near(square.getpixel((3, 16)), corpus.RED) and near(square.getpixel((28, 16)), corpus.BLUE)
    wide, _ = load_image(MediaInput(uri=path), spec_for(root, resize="fit"), 128, 32)
    pixels = np.asarray(wide)
    assert wide.size == (128, 32) and (pixels[:, :31] == 0).all() and (pixels[:, -31:] == 0).all()


def test_resize_error_names_both_sizes(root):
    path = corpus.good_png(root, size=(64, 32))
    expect_error(load_image, MediaInput(uri=path), spec_for(root, resize="error"), 32, 32,
                 contains=("64x32", "32x32", "resize"))
    assert load_image(MediaInput(uri=path), spec_for(root, resize="error"), 64, 32)[0].size == (64, 32)
    expect_error(load_image, MediaInput(uri=path), spec_for(root, resize="stretch"), 32, 32,
                 contains=("render.media_resize must be one of",))
    expect_error(load_image, MediaInput(uri=path), spec_for(root), 0, 32, contains=("width",))


BAD_IMAGES = [
    ("truncated PNG", lambda d: corpus.truncated_png(d), {}, ("truncated",)),
    ("text named .png", corpus.text_named_png, {}, ("not an image in a supported format",)),
    ("PostScript named .png", corpus.eps_named_png, {}, ("not an image in a supported format",)),
    ("animated GIF", corpus.animated_gif, {}, ("animated", "GIF", "3 frames")),
    ("animated PNG", corpus.animated_png, {}, ("animated", "PNG", "3 frames")),
    ("bomb over max_pixels", lambda d: corpus.bomb_png(d, 4000, 4000), {"max_pixels": 1_000_000},
     ("4000x4000", "limits.max_media_pixels (1000000)", "not decoded")),
    ("bomb PIL warns about", lambda d: corpus.bomb_png(d, 10000, 10000), {"max_pixels": 10**12},
     ("decompression bomb",)),
    ("bomb PIL refuses", lambda d: corpus.bomb_png(d, 20000, 10000), {"max_pixels": 10**12},
     ("decompression bomb",)),
    ("over max_bytes", lambda d: corpus.oversized_png(d, 20_000), {"max_bytes": 10_000}, ("limits.max_media_bytes",)),
]


@pytest.mark.parametrize("build,overrides,message", [c[1:] for c in BAD_IMAGES],
                         ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_fail_with_a_clear_message(root, build, overrides, message):
    path = build(root)
    expect_error(load_image, MediaInput(uri=path), spec_for(root, **overrides), 32, 32, contains=message)


def test_pixel_count_is_checked_before_any_pixel_is_decoded(root, monkeypatch):
    from PIL import ImageFile

    path = corpus.bomb_png(root, 4000, 4000)
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    expect_error(load_image, MediaInput(uri=path), spec_for(root, max_pixels=1_000_000), 8, 8,
                 contains=("limits.max_media_pixels",))
    assert loads == []


def _corruptions(data: bytes, seed: int, count: int):
    rng = np.random.default_rng(seed)
    for cut in np.linspace(1, len(data) - 1, count // 2).astype(int):
        yield data[:cut]
    for _ in range(count - count // 2):
        flipped = bytearray(data)
        for at in rng.integers(0, len(data), 8):
            flipped[at] = int(rng.integers(0, 256))
        yield bytes(flipped)


def test_corrupt_images_never_raise_anything_but_media_error(root):
    sources = [corpus.good_png(root), corpus.good_jpeg(root), corpus.animated_gif(root),
               corpus.png16(root), corpus.cmyk_jpeg(root), corpus.palette_png_transparent(root)]
    failures = 0
    for seed, path in enumerate(sources):
        for data in _corruptions(Path(path).read_bytes(), seed, 40):
            try:
                image, _ = load_image(MediaInput(data=data), MediaSpec(), 24, 16)
                assert (image.mode, image.size) == ("RGB", (24, 16))
            except MediaError as exc:
                failures += 1
                assert "\n" not in str(exc) and len(str(exc)) <= 300
    assert failures > 0


# ----------------------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The video corpus, built once: ffmpeg runs are the slow part of this file."""
    folder = tmp_path_factory.mktemp("videos")
    ramp = corpus.ramp_video(folder)  # 10 frames 64x48, frame i a flat grey
    faststart = corpus.ramp_video(folder, name="faststart.mp4", faststart=True)
    return {
        "folder": folder,
        "ramp": ramp,
        "short": corpus.ramp_video(folder, frames=3, name="short.mp4"),
        "gap": corpus.gap_video(folder),
        "rotated": corpus.rotated_video(folder, ramp),
        "gif": corpus.gif_video(folder),
        "truncated": corpus.truncated(folder, ramp),  # moov atom (at the end) cut off
        "truncated_faststart": corpus.truncated(folder, faststart, keep=0.8),
        "audio": corpus.audio_only(folder),
        "cover": corpus.audio_with_cover(folder),
        "garbage": corpus.garbage(folder),
        "png": corpus.good_png(folder, name="still.png"),
        "concat": corpus.concat_list(folder, ramp),
    }


def vspec(videos, **overrides) -> MediaSpec:
    return MediaSpec(roots=(str(videos["folder"]),), **overrides)


def test_video_gives_exactly_the_first_frames_in_order_at_the_size_asked(videos):
    frames, digest = load_video(MediaInput(uri=videos["ramp"]), vspec(videos), 8, 32, 24)
    assert digest == sha(videos["ramp"])
    assert len(frames) == 8
    assert all((f.mode, f.size) == ("RGB", (32, 24)) for f in frames)
    means = [float(np.asarray(f).mean()) for f in frames]
    for got, want in zip(means, corpus.grey_levels(10)[:8]):
        assert abs(got - want) < 4, (means, corpus.grey_levels(10))
    every, _ = load_video(MediaInput(uri=videos["ramp"]), vspec(videos), 10, 64, 48)
    assert len(every) == 10 and every[0].size == (64, 48)


def test_variable_frame_rate_video_gives_its_own_frames_without_repeats(videos):
    frames, _ = load_video(MediaInput(uri=videos["gap"]), vspec(videos), 6, 16, 16)
    means = [float(np.asarray(f).mean()) for f in frames]
    assert all(abs(got - want) < 4 for got, want in zip(means, corpus.grey_levels(10))), means


def test_decoding_stops_after_the_frames_the_row_needs(videos, monkeypatch):
    outputs = []
    run = subprocess.run

    def recording_run(argv, *args, **kwargs):
        proc = run(argv, *args, **kwargs)
        outputs.append(len(proc.stdout or b""))
        return proc

    monkeypatch.setattr(subprocess, "run", recording_run)
    load_video(MediaInput(uri=videos["ramp"]), vspec(videos), 2, 16, 16)
    assert outputs[-1] == 2 * 16 * 16 * 3  # the video has 10 frames; ffmpeg wrote 2


def test_video_resize_policies(videos):
    source = MediaInput(uri=videos["ramp"])  # 64x48 flat grey
    fit, _ = load_video(source, vspec(videos, resize="fit"), 2, 32, 40)
    pixels = np.asarray(fit[1])
    assert fit[1].size == (32, 40)
    assert (pixels[:7] == 0).all() and (pixels[-7:] == 0).all(), "fit pads black above and below"
    assert abs(float(pixels[20].mean()) - corpus.grey_levels(10)[1]) < 4
    crop, _ = load_video(source, vspec(videos, resize="crop"), 2, 32, 40)
    pixels = np.asarray(crop[1])
    assert crop[1].size == (32, 40) and abs(float(pixels.mean()) - corpus.grey_levels(10)[1]) < 4
    expect_error(load_video, source, vspec(videos, resize="error"), 2, 32, 40,
                 contains=("64x48", "32x40", "resize"))
    exact, _ = load_video(source, vspec(videos, resize="error"), 2, 64, 48)
    assert exact[0].size == (64, 48)


def test_rotated_video_is_sized_as_displayed(videos):
    frames, _ = load_video(MediaInput(uri=videos["rotated"]), vspec(videos, resize="error"), 3, 48, 64)
    assert len(frames) == 3 and frames[0].size == (48, 64)


def test_gif_is_an_allowed_video_container(videos):
    frames, _ = load_video(MediaInput(uri=videos["gif"]), vspec(videos), 6, 32, 24)
    assert len(frames) == 6


def test_inline_video_bytes(videos):
    data = Path(videos["ramp"]).read_bytes()
    frames, digest = load_video(MediaInput(data=data), MediaSpec(), 4, 16, 16)
    assert len(frames) == 4 and digest == hashlib.sha256(data).hexdigest()
    expect_error(load_video, MediaInput(data=data), MediaSpec(max_bytes=100), 4, 16, 16,
                 contains=("limits.max_media_bytes",))


BAD_VIDEOS = [
    ("too few frames", "short", {}, ("only 3 decodable frames", "needs 8")),
    ("audio only", "audio", {}, ("no video stream", "audio only")),
    ("audio with cover art", "cover", {}, ("no video stream", "cover picture")),
    ("truncated, index lost", "truncated", {}, ("not a video ffmpeg can read",)),
    ("truncated, index kept", "truncated_faststart", {}, ("decodable frames", "needs 8")),
    ("random bytes", "garbage", {}, ("not a video",)),
    ("a still image", "png", {}, ("not a video in an allowed container format",)),
    ("ffconcat list", "concat", {}, ("not a video in an allowed container format",)),
    ("over max_pixels", "ramp", {"max_pixels": 1000}, ("64x48", "limits.max_media_pixels (1000)")),
    ("over max_video_frames", "ramp", {"max_video_frames": 4}, ("8 video frames", "limits.max_media_frames (4)")),
    ("over max_bytes", "ramp", {"max_bytes": 500}, ("limits.max_media_bytes (500",)),
    ("decode timeout", "ramp", {"decode_timeout_s": 0.001}, ("decode_timeout_s",)),
]


@pytest.mark.parametrize("name,overrides,message", [c[1:] for c in BAD_VIDEOS],
                         ids=[c[0] for c in BAD_VIDEOS])
def test_bad_videos_fail_with_a_clear_message(videos, name, overrides, message):
    expect_error(load_video, MediaInput(uri=videos[name]), vspec(videos, **overrides), 8, 32, 24,
                 contains=message)


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that records every connection made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.05)
    connections: list = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, address = server.accept()
            except OSError:
                continue
            connections.append(address)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connections
    stop.set()
    thread.join(2)
    server.close()


def test_hls_playlist_never_reaches_the_network_or_other_files(videos, listener, tmp_path):
    port, connections = listener
    playlist = corpus.hls_playlist(tmp_path, videos["ramp"], port)
    spec = MediaSpec(roots=(str(tmp_path),), decode_timeout_s=10)
    expect_error(load_video, MediaInput(uri=playlist), spec, 1, 16, 16, contains=("video",))
    # Even named .m3u8 (the one name ffmpeg's HLS demuxer accepts), the format whitelist stops it.
    expect_error(media.probe_video, playlist, spec, contains=("not a video in an allowed container format",))
    assert connections == []


def test_protocol_whitelist_alone_keeps_a_playlist_off_the_network(videos, listener, tmp_path, monkeypatch):
    port, connections = listener
    playlist = corpus.hls_playlist(tmp_path, videos["ramp"], port)
    spec = MediaSpec(decode_timeout_s=10)
    monkeypatch.setattr(media, "VIDEO_FORMATS", media.VIDEO_FORMATS + ",hls,mpegts")
    # HLS let through: it reads the local segment, but the network stays closed.
    assert media.probe_video(playlist, spec).container == "hls"
    assert connections == []
    # And this test would notice a connection: with http allowed too, ffmpeg does connect.
    monkeypatch.setattr(media, "VIDEO_PROTOCOLS", "file,http,tcp")
    try:
        media.probe_video(playlist, spec)
    except MediaError:
        pass
    assert connections


def test_temp_files_are_always_removed(videos, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    load_video(MediaInput(uri=videos["ramp"]), vspec(videos), 2, 16, 16)
    for name in ("short", "garbage", "audio"):
        with pytest.raises(MediaError):
            load_video(MediaInput(uri=videos[name]), vspec(videos), 8, 16, 16)
    with pytest.raises(MediaError):
        load_video(MediaInput(uri=videos["ramp"]), vspec(videos, max_bytes=100), 2, 16, 16)
    assert list(scratch.iterdir()) == []


def test_corrupt_videos_never_raise_anything_but_media_error(videos):
    data = Path(videos["ramp"]).read_bytes()
    outcomes = []
    for corrupt in _corruptions(data, 7, 10):
        try:
            frames, _ = load_video(MediaInput(data=corrupt), MediaSpec(), 4, 16, 16)
            assert len(frames) == 4 and frames[0].size == (16, 16)
            outcomes.append("ok")
        except MediaError as exc:
            assert "\n" not in str(exc) and len(str(exc)) <= 300
            outcomes.append("error")
    assert "error" in outcomes
