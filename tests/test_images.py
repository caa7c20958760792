"""Image inputs: every accepted form, every refusal, RGB conversion, shrinking, hashing, and remote
fetching against a local HTTP(S) server."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageFile

from streamvlm.contract.config import EngineConfig, ImageInputConfig
from streamvlm.inputs import images
from streamvlm.inputs.images import (
    LoadedImage,
    blocked_address_reason,
    check_image_count,
    load_image,
    load_image_sync,
)

LOCAL = ImageInputConfig(allow_local_image_paths=True)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 6 % 256, y * 8 % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny IDAT: a decompression bomb stand-in."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def no_full_decode(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# --- forms ----------------------------------------------------------------------------------------------------


def test_pil_image_is_copied_not_modified():
    source = gradient()
    loaded = load_image_sync(source, ImageInputConfig())
    assert loaded.image.mode == "RGB" and loaded.image.size == (40, 30)
    assert loaded.image is not source
    assert loaded.image.tobytes() == source.tobytes()


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like(wrap):
    loaded = load_image_sync(wrap(encode(gradient())), ImageInputConfig())
    assert loaded.image.tobytes() == gradient().tobytes()


def test_data_url():
    loaded = load_image_sync(data_url(encode(gradient())), ImageInputConfig())
    assert loaded.hash == load_image_sync(gradient(), ImageInputConfig()).hash


def test_data_url_with_whitespace_and_no_padding():
    payload = base64.b64encode(encode(gradient(7, 5))).decode().rstrip("=")
    wrapped = "\n".join(payload[i:i + 60] for i in range(0, len(payload), 60))
    loaded = load_image_sync(f"data:image/png;base64,{wrapped}", ImageInputConfig())
    assert loaded.image.size == (7, 5)


def test_local_path_needs_permission(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(gradient()))
    for source in (str(path), path, path.as_uri()):
        with pytest.raises(ValueError, match="local image paths are disabled"):
            load_image_sync(source, ImageInputConfig())
        assert load_image_sync(source, LOCAL).image.size == (40, 30)


def test_async_load_runs_in_a_thread(tmp_path: Path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(encode(gradient()))
    main_thread = threading.get_ident()
    decode_threads: list[int] = []
    original = images.decode_image_bytes

    def spy(data, limits):
        decode_threads.append(threading.get_ident())
        return original(data, limits)

    monkeypatch.setattr(images, "decode_image_bytes", spy)

    async def main() -> list[LoadedImage]:
        return list(await asyncio.gather(load_image(gradient(), LOCAL), load_image(str(path), LOCAL),
                                         load_image(data_url(encode(gradient())), LOCAL)))

    loaded = asyncio.run(main())
    assert len({item.hash for item in loaded}) == 1
    assert decode_threads and main_thread not in decode_threads


def test_image_section_reads_the_engine_settings():
    limits = EngineConfig(max_image_size=512, allowed_image_hosts=["Example.COM", "[::1]"],
                          allow_remote_images=True).image
    assert limits.max_image_size == 512 and limits.allow_remote_images
    assert limits.allowed_image_hosts == ("example.com", "::1")
    assert limits.max_image_bytes == ImageInputConfig().max_image_bytes


def test_image_count():
    check_image_count(8, ImageInputConfig())
    with pytest.raises(ValueError, match="max_images_per_request"):
        check_image_count(9, ImageInputConfig())


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [42, None, {"url": "x"}, ["a"]])
def test_unsupported_source_type_lists_accepted_forms(source):
    with pytest.raises(ValueError, match="unsupported image source.*data:image"):
        load_image_sync(source, ImageInputConfig())


def test_unknown_url_scheme():
    with pytest.raises(ValueError, match="unsupported image URL scheme 'ftp'"):
        load_image_sync("ftp://example.com/a.png", LOCAL)


@pytest.mark.parametrize("data", [b"definitely not an image", b"", b"P", b"\x89PNG\r\n\x1a\n"])
def test_undecodable_data(data):
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image_sync(data, ImageInputConfig())


def test_truncated_image():
    data = encode(gradient(200, 200))
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image_sync(data[:len(data) // 2], ImageInputConfig())


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "ICO", "QOI"])
def test_unsupported_format(fmt):
    with pytest.raises(ValueError, match=f"unsupported image format: {fmt}"):
        load_image_sync(encode(gradient(16, 16), fmt), ImageInputConfig())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats(fmt):
    assert load_image_sync(encode(gradient(), fmt), ImageInputConfig()).image.size == (40, 30)


SMALL_PNG = encode(gradient(40, 30))


def test_pixel_limit_checked_before_decoding(no_full_decode):
    with pytest.raises(ValueError, match="too many pixels: 10000x5000"):
        load_image_sync(png_header_only(10_000, 5_000), ImageInputConfig())
    with pytest.raises(ValueError, match="too many pixels: 40x30"):
        load_image_sync(SMALL_PNG, ImageInputConfig(max_image_pixels=1000))


def test_decompression_bomb_refused_without_decoding(no_full_decode):
    with pytest.raises(ValueError, match="too many pixels"):
        load_image_sync(png_header_only(100_000, 100_000), ImageInputConfig(max_image_pixels=2**62))


def test_pil_image_over_pixel_limit():
    with pytest.raises(ValueError, match="too many pixels"):
        load_image_sync(gradient(40, 30), ImageInputConfig(max_image_pixels=1000))


def test_byte_limit():
    data = encode(gradient())
    limits = ImageInputConfig(max_image_bytes=len(data) - 1, allow_local_image_paths=True)
    with pytest.raises(ValueError, match="image data is .* over the max_image_bytes limit"):
        load_image_sync(data, limits)
    with pytest.raises(ValueError, match="decoded base64 image data is .* over the max_image_bytes limit"):
        load_image_sync(data_url(data), limits)
    assert load_image_sync(data, ImageInputConfig(max_image_bytes=len(data))).image.size == (40, 30)


def test_file_byte_limit(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(gradient()))
    with pytest.raises(ValueError, match="over the max_image_bytes limit"):
        load_image_sync(path, ImageInputConfig(allow_local_image_paths=True, max_image_bytes=100))


@pytest.mark.parametrize("url, cause", [
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64|cannot decode image"),
    ("data:text/plain;base64,aGVsbG8=", "media type must be image"),
    ("data:image/svg+xml,<svg/>", "must be base64-encoded"),
    ("data:image/png;base64", "malformed data URL"),
])
def test_bad_data_urls(url, cause):
    with pytest.raises(ValueError, match=cause):
        load_image_sync(url, ImageInputConfig())


def test_file_not_found(tmp_path: Path):
    with pytest.raises(ValueError, match="image file not found"):
        load_image_sync(tmp_path / "missing.png", LOCAL)
    with pytest.raises(ValueError, match="image path is not a regular file"):
        load_image_sync(tmp_path, LOCAL)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")  # opening it for reading must not wait for a writer
        with pytest.raises(ValueError, match="image path is not a regular file"):
            load_image_sync(tmp_path / "fifo", LOCAL)


def test_file_url_with_remote_host():
    with pytest.raises(ValueError, match="must name a local path"):
        load_image_sync("file://example.com/etc/passwd", LOCAL)


def test_remote_disabled():
    with pytest.raises(ValueError, match="remote image URLs are disabled"):
        load_image_sync("https://example.com/a.png", ImageInputConfig())
    with pytest.raises(ValueError, match="remote image URLs are disabled"):
        asyncio.run(load_image("https://example.com/a.png", ImageInputConfig()))
    with pytest.raises(ValueError, match="use the async load_image"):
        load_image_sync("https://example.com/a.png", ImageInputConfig(allow_remote_images=True))


# --- conversion, orientation, shrinking, hashing ---------------------------------------------------------------


def test_modes_become_rgb_like_transformers():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    rgba = Image.new("RGBA", (4, 2), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (200, 10, 10, 0))
    rgba.putpixel((1, 0), (0, 0, 200, 128))
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    la = Image.new("LA", (4, 2), (90, 255))
    la.putpixel((0, 0), (90, 0))
    sources = {"RGBA": rgba, "P": palette, "LA": la, "L": Image.new("L", (4, 2), 77),
               "CMYK": Image.new("CMYK", (4, 2), (0, 255, 0, 0)), "1": Image.new("1", (4, 2), 1)}
    for mode, image in sources.items():
        loaded = load_image_sync(image, ImageInputConfig()).image
        expected = image_transforms.convert_to_rgb(image, return_numpy=True)
        assert loaded.mode == "RGB", mode
        assert loaded.tobytes() == expected.tobytes(), mode
    assert load_image_sync(rgba, ImageInputConfig()).image.getpixel((0, 0)) == (255, 255, 255)
    assert load_image_sync(palette, ImageInputConfig()).image.getpixel((0, 0)) == (255, 255, 255)
    assert load_image_sync(palette, ImageInputConfig()).image.getpixel((1, 0)) == (10, 200, 30)


def test_png_with_transparency_decodes_to_white_background():
    image = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    assert load_image_sync(encode(image), ImageInputConfig()).image.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored unrotated; display rotated 90 degrees clockwise
    loaded = load_image_sync(encode(image, "PNG", exif=exif.tobytes()), ImageInputConfig()).image
    assert loaded.size == (10, 20)
    assert loaded.getpixel((9, 0)) == (255, 0, 0)


@pytest.mark.parametrize("size, expected", [((5000, 1000), (1000, 200)), ((999, 3000), (333, 1000)),
                                            ((100_000, 2), (1000, 1)), ((1000, 1000), (1000, 1000))])
def test_shrink_keeps_aspect(size, expected):
    limits = ImageInputConfig(max_image_size=1000, max_image_pixels=10**9)
    assert load_image_sync(Image.new("L", size), limits).image.size == expected


def test_hash_depends_on_pixels_not_encoding():
    image = gradient()
    png = load_image_sync(encode(image, "PNG"), ImageInputConfig())
    bmp = load_image_sync(encode(image, "BMP"), ImageInputConfig())
    pil = load_image_sync(image, ImageInputConfig())
    assert png.hash == bmp.hash == pil.hash and len(png.hash) == 32
    assert png == bmp and hash(png) == hash(bmp)
    changed = image.copy()
    changed.putpixel((3, 3), (1, 2, 3))
    assert load_image_sync(changed, ImageInputConfig()).hash != png.hash
    transposed = load_image_sync(Image.new("RGB", (2, 3)), ImageInputConfig())
    assert transposed.hash != load_image_sync(Image.new("RGB", (3, 2)), ImageInputConfig()).hash


# --- address policy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("100.64.0.1", "non-global"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None),
])
def test_blocked_address_reason(address, reason):
    assert blocked_address_reason(ipaddress.ip_address(address)) == reason


# --- remote fetching ------------------------------------------------------------------------------------------


PNG = encode(gradient())


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    stopping: threading.Event
    host_headers: list[str]


class Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.host_headers.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        try:
            self.route(port)
        except OSError:
            pass  # the client gave up (timeouts, byte limits): expected

    def route(self, port: int) -> None:
        if self.path == "/image.png":
            self.reply(200, PNG)
        elif self.path == "/missing":
            self.reply(404, b"no")
        elif self.path == "/redirect":
            self.reply(302, b"", location="/image.png")
        elif self.path == "/redirect-metadata":
            self.reply(302, b"", location="http://169.254.169.254/latest/meta-data/")
        elif self.path == "/redirect-loopback":
            self.reply(302, b"", location=f"http://127.0.0.2:{port}/image.png")
        elif self.path == "/redirect-ftp":
            self.reply(302, b"", location="ftp://example.com/a.png")
        elif self.path == "/loop":
            self.reply(302, b"", location="/loop")
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif self.path == "/gzip":
            self.reply(200, zlib.compress(PNG), content_encoding="gzip")
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body runs until the connection closes
            for _ in range(2000):
                if self.server.stopping.is_set():
                    return
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            # Trickles: no single read waits long, only the whole fetch is slow.
            for _ in range(1000):
                if self.server.stopping.wait(0.05):
                    return
                self.wfile.write(b"\0")
                self.wfile.flush()
        else:
            self.reply(404, b"unknown")

    def reply(self, status: int, body: bytes, location: str | None = None, content_encoding: str | None = None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        if content_encoding:
            self.send_header("Content-Encoding", content_encoding)
        self.end_headers()
        self.wfile.write(body)


def start_server(tls: ssl.SSLContext | None = None) -> ImageServer:
    server = ImageServer(("127.0.0.1", 0), Handler)
    server.stopping = threading.Event()
    server.host_headers = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server: ImageServer) -> None:
    server.stopping.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    server = start_server()
    yield server
    stop_server(server)


def url(server: ImageServer, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}{path}"


REMOTE = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.1",), image_fetch_timeout=5.0)


def fetch(source: str, limits: ImageInputConfig = REMOTE) -> LoadedImage:
    return asyncio.run(load_image(source, limits))


def test_remote_disabled_refuses_before_connecting(server):
    seen = len(server.host_headers)
    with pytest.raises(ValueError, match="remote image URLs are disabled"):
        fetch(url(server, "/image.png"), ImageInputConfig())
    assert len(server.host_headers) == seen


def test_loopback_refused_unless_allowed(server):
    seen = len(server.host_headers)
    with pytest.raises(ValueError, match="127.0.0.1 is a loopback address"):
        fetch(url(server, "/image.png"), ImageInputConfig(allow_remote_images=True))
    with pytest.raises(ValueError, match=r"localhost \(127.0.0.1\): 127.0.0.1 is a loopback address"):
        fetch(url(server, "/image.png", host="localhost"), ImageInputConfig(allow_remote_images=True))
    assert len(server.host_headers) == seen


def test_allowed_host_is_fetched(server):
    loaded = fetch(url(server, "/image.png"))
    assert loaded.hash == load_image_sync(PNG, ImageInputConfig()).hash
    by_name = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("localhost",))
    assert fetch(url(server, "/image.png", host="localhost"), by_name).hash == loaded.hash
    by_network = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.0/8",))
    assert fetch(url(server, "/image.png"), by_network).hash == loaded.hash


def test_connects_to_the_checked_address(server, monkeypatch):
    """DNS rebinding: the host resolves once; a second answer would fail the test."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host == "rebind.test":
            return real_getaddrinfo(next(answers), port, *args, **kwargs)  # StopIteration on a second lookup
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    loaded = fetch(url(server, "/image.png", host="rebind.test"))
    assert loaded.image.size == (40, 30)
    assert server.host_headers[-1] == f"rebind.test:{server.server_address[1]}"


def test_not_found(server):
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch(url(server, "/missing"))


def test_redirects(server):
    assert fetch(url(server, "/redirect")).image.size == (40, 30)
    with pytest.raises(ValueError, match="169.254.169.254 is a link-local address"):
        fetch(url(server, "/redirect-metadata"))
    with pytest.raises(ValueError, match="127.0.0.2 is a loopback address"):
        fetch(url(server, "/redirect-loopback"))
    by_network = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.0/8",))
    assert fetch(url(server, "/redirect"), by_network).image.size == (40, 30)
    with pytest.raises(ValueError, match="unsupported image URL scheme 'ftp'"):
        fetch(url(server, "/redirect-ftp"))
    with pytest.raises(ValueError, match="more than 5 redirects"):
        fetch(url(server, "/loop"))


def test_timeout_bounds_the_whole_fetch(server):
    start = time.monotonic()
    with pytest.raises(ValueError, match="timed out after 0.5s"):
        fetch(url(server, "/slow"), ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.1",),
                                                image_fetch_timeout=0.5))
    assert time.monotonic() - start < 2.0


def test_byte_limit_while_downloading(server):
    limits = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.1",), max_image_bytes=100_000)
    with pytest.raises(ValueError, match=r"Content-Length\) is 1000000000 bytes, over the max_image_bytes"):
        fetch(url(server, "/declared-big"), limits)
    # Endless body without Content-Length: reading stops at the limit (a timeout would fail the match).
    with pytest.raises(ValueError, match=r"image download .* over the max_image_bytes limit"):
        fetch(url(server, "/endless"), limits)
    with pytest.raises(ValueError, match="image at .* over the max_image_bytes limit"):
        fetch(url(server, "/image.png"), ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("127.0.0.1",),
                                                     max_image_bytes=len(PNG) - 1))


def test_compressed_body_refused(server):
    with pytest.raises(ValueError, match="Content-Encoding 'gzip'"):
        fetch(url(server, "/gzip"))


def test_unresolvable_host():
    with pytest.raises(ValueError, match="cannot resolve image host"):
        fetch("http://does-not-exist.invalid/a.png")


def self_signed_tls(hostname: str) -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate for hostname, and its PEM."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert_pem, key_pem


@pytest.mark.parametrize("cert_host, ok", [("images.test", True), ("other.test", False)])
def test_https_verifies_the_hostname_while_pinned(tmp_path: Path, monkeypatch, cert_host, ok):
    cert_pem, key_pem = self_signed_tls(cert_host)
    (tmp_path / "cert.pem").write_text(cert_pem)
    (tmp_path / "key.pem").write_text(key_pem)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_tls = ssl.create_default_context(cadata=cert_pem)

    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return real_getaddrinfo("127.0.0.1" if host == "images.test" else host, port, *args, **kwargs)

    real_client = images._http_client

    def trusting_client(limits):
        client = real_client(limits)
        return httpx.AsyncClient(verify=client_tls, trust_env=False, follow_redirects=False,
                                 timeout=limits.image_fetch_timeout, headers=client.headers)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(images, "_http_client", trusting_client)
    server = start_server(server_tls)
    try:
        limits = ImageInputConfig(allow_remote_images=True, allowed_image_hosts=("images.test",),
                             image_fetch_timeout=5.0)
        source = url(server, "/image.png", host="images.test", scheme="https")
        if ok:
            assert fetch(source, limits).image.size == (40, 30)
        else:
            with pytest.raises(ValueError, match="images.test.*CERTIFICATE_VERIFY_FAILED"):
                fetch(source, limits)
    finally:
        stop_server(server)
