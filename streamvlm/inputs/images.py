"""Image inputs: turn what a request carries (PIL images, bytes, data/file/http URLs, paths) into
checked, RGB, size-bounded PIL images with a content hash.

Everything here refuses untrusted input early: the byte limit before decoding, the pixel count
from the header before the pixels are decoded, and remote hosts on private networks before
connecting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import os
import re
import socket
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from streamvlm.contract.config import ImageInputConfig, normalize_host

# Only these Pillow plugins parse untrusted input.
DECODER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# The JPEG plugin reports multi-picture JPEGs (what many phone cameras write) as "MPO"; frame 0 is a JPEG.
ALLOWED_FORMATS = (*DECODER_FORMATS, "MPO")
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ACCEPTED_FORMS = ("a PIL image, image bytes, a data:image/<format>;base64,... URL, an http(s) URL "
                  "(when allow_remote_images is on), or a local path or file:// URL (when "
                  "allow_local_image_paths is on)")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


class ImageInputError(ValueError):
    """An image source that was refused or could not be read; the message names the cause."""


@dataclass(frozen=True)
class LoadedImage:
    # Equality and hashing go by the content hash, not a pixel-by-pixel compare.
    image: Image.Image = field(compare=False)
    hash: str


def check_image_count(count: int, limits: ImageInputConfig) -> None:
    if count > limits.max_images_per_request:
        raise ImageInputError(f"request has {count} images; max_images_per_request is "
                              f"{limits.max_images_per_request}")


@dataclass(frozen=True)
class PendingImage:
    """An image read and checked from its header, not yet decoded: its encoded bytes, or a caller's
    PIL image. ``size`` is (width, height) as stored, before the EXIF orientation."""

    size: tuple[int, int]
    data: bytes | None = None
    image: Image.Image | None = field(default=None, compare=False)

    @property
    def num_pixels(self) -> int:
        return self.size[0] * self.size[1]


async def load_image(source: object, limits: ImageInputConfig) -> LoadedImage:
    """Load any accepted form without blocking the event loop: http(s) is fetched asynchronously,
    file reading, decoding, resizing and hashing run in a worker thread."""
    pending = await read_image(source, limits)
    return await asyncio.to_thread(decode_pending_image, pending, limits)


async def read_image(source: object, limits: ImageInputConfig) -> PendingImage:
    """Fetch or read an image's bytes and check its header, without decoding its pixels; http(s) is
    fetched asynchronously, the rest runs in a worker thread."""
    if isinstance(source, str) and _url_scheme(source) in ("http", "https"):
        if not limits.allow_remote_images:
            raise _remote_disabled()
        data = await fetch_image_bytes(source, limits)
        return await asyncio.to_thread(_pending_from_bytes, data, limits)
    return await asyncio.to_thread(read_image_sync, source, limits)


def load_image_sync(source: object, limits: ImageInputConfig) -> LoadedImage:
    """Load every accepted form except http(s) URLs (those need ``load_image``)."""
    return decode_pending_image(read_image_sync(source, limits), limits)


def read_image_sync(source: object, limits: ImageInputConfig) -> PendingImage:
    """``read_image`` for every accepted form except http(s) URLs."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, limits)
        return PendingImage(size=source.size, image=source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_byte_count(memoryview(source).nbytes, limits, "image data")
        return _pending_from_bytes(source if isinstance(source, bytes) else bytes(source), limits)
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return _pending_from_bytes(_read_local_file(path, limits), limits)
    if isinstance(source, str):
        return _pending_from_bytes(_string_bytes(source, limits), limits)
    raise ImageInputError(f"unsupported image source of type {type(source).__name__}; accepted: {ACCEPTED_FORMS}")


def decode_pending_image(pending: PendingImage, limits: ImageInputConfig) -> LoadedImage:
    if pending.image is not None:
        return _finish(pending.image, limits, owned=False)
    assert pending.data is not None
    return decode_image_bytes(pending.data, limits)


def _pending_from_bytes(data: bytes, limits: ImageInputConfig) -> PendingImage:
    return PendingImage(size=probe_image_bytes(data, limits), data=data)


def _string_bytes(source: str, limits: ImageInputConfig) -> bytes:
    if not source:
        raise ImageInputError(f"image source is an empty string; accepted: {ACCEPTED_FORMS}")
    if source[:5].lower() == "data:":
        return decode_data_url(source, limits)
    scheme = _url_scheme(source)
    if scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise _remote_disabled()
        raise ImageInputError("load_image_sync cannot fetch http(s) URLs; use the async load_image")
    if scheme == "file":
        return _read_local_file(_file_url_path(source), limits)
    if scheme is not None:
        raise ImageInputError(f"unsupported image URL scheme {scheme!r}; accepted: {ACCEPTED_FORMS}")
    return _read_local_file(source, limits)


def _url_scheme(source: str) -> str | None:
    match = _URL_SCHEME.match(source)
    return match.group(1).lower() if match else None


def _remote_disabled() -> ImageInputError:
    return ImageInputError("remote image URLs are disabled (allow_remote_images is off); send the image "
                           "as a data:image/...;base64 URL instead")


def _check_byte_count(size: int, limits: ImageInputConfig, what: str) -> None:
    if size > limits.max_image_bytes:
        raise ImageInputError(f"{what} is {size} bytes, over the max_image_bytes limit of {limits.max_image_bytes}")


def _check_pixels(size: tuple[int, int], limits: ImageInputConfig) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise ImageInputError(f"image has too many pixels: {width}x{height} = {width * height}, over the "
                              f"max_image_pixels limit of {limits.max_image_pixels}")


# --- data URLs and local files -------------------------------------------------------------------------------


def decode_data_url(url: str, limits: ImageInputConfig) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageInputError("malformed data URL: no ',' after the media type")
    params = [part.strip().lower() for part in header[5:].split(";")]
    if not params[0].startswith("image/"):
        raise ImageInputError(f"data URL media type must be image/*, got {params[0] or 'none'!r}")
    if params[-1] != "base64":
        raise ImageInputError("image data URLs must be base64-encoded (data:image/<format>;base64,...)")
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    # Refuse by the decoded size before spending memory on decoding.
    padding = len(payload) - len(payload.rstrip("="))
    _check_byte_count(len(payload) // 4 * 3 - padding, limits, "decoded base64 image data")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"invalid base64 in image data URL: {exc}") from exc


def _file_url_path(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageInputError(f"file:// image URLs must name a local path, got host {parsed.netloc!r}")
    return urllib.request.url2pathname(parsed.path)


def _read_local_file(path: str, limits: ImageInputConfig) -> bytes:
    if not limits.allow_local_image_paths:
        raise ImageInputError("local image paths are disabled (allow_local_image_paths is off); send the image "
                              "as a data:image/...;base64 URL instead")
    try:
        # O_NONBLOCK: opening a FIFO must not hang; the fstat below refuses anything but a regular file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise ImageInputError(f"image file not found: {path}") from exc
    except OSError as exc:
        raise ImageInputError(f"cannot open image file {path}: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageInputError(f"image path is not a regular file: {path}")
    with open(fd, "rb", closefd=True) as file:
        _check_byte_count(info.st_size, limits, f"image file {path}")
        try:
            data = file.read(limits.max_image_bytes + 1)
        except OSError as exc:
            raise ImageInputError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    _check_byte_count(len(data), limits, f"image file {path}")
    return data


# --- decoding --------------------------------------------------------------------------------------------------


def probe_image_bytes(data: bytes, limits: ImageInputConfig) -> tuple[int, int]:
    """(width, height) from the header of encoded image bytes, format and pixel count checked;
    the pixels are not decoded."""
    with _open_checked(data, limits) as image:
        return image.size


def decode_image_bytes(data: bytes, limits: ImageInputConfig) -> LoadedImage:
    """Decode encoded image bytes (format and pixel count checked from the header first)."""
    with _open_checked(data, limits) as image:
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageInputError(f"image has too many pixels: {exc}") from exc
        except Exception as exc:
            raise ImageInputError(f"cannot decode image: {exc}") from exc
        return _finish(image, limits, owned=True)


def _open_checked(data: bytes, limits: ImageInputConfig) -> Image.Image:
    """The image opened lazily (header only), its format and pixel count checked."""
    _check_byte_count(len(data), limits, "image data")
    try:
        image = Image.open(io.BytesIO(data), formats=DECODER_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"image has too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _unsupported_or_undecodable(data, exc) from exc
    except Exception as exc:  # Pillow's header parsers raise many types on malformed input
        raise ImageInputError(f"cannot decode image: {exc}") from exc
    try:
        if image.format not in ALLOWED_FORMATS:
            raise ImageInputError(f"unsupported image format: {image.format}; allowed: {', '.join(ALLOWED_FORMATS)}")
        _check_pixels(image.size, limits)
    except BaseException:
        image.close()
        raise
    return image


def _unsupported_or_undecodable(data: bytes, error: Exception) -> ImageInputError:
    """Name the format when its magic bytes say it is one we do not allow. Only the plugins' magic-byte
    checks run: the other plugins' header parsers never see untrusted data."""
    Image.init()
    prefix = data[:16]
    detected = next((name for name, (_, accept) in Image.OPEN.items() if _accepts(accept, prefix)), None)
    if detected is not None and detected not in ALLOWED_FORMATS:
        return ImageInputError(f"unsupported image format: {detected}; allowed: {', '.join(ALLOWED_FORMATS)}")
    return ImageInputError(f"cannot decode image: {error}")


def _accepts(accept: Any, prefix: bytes) -> bool:
    if accept is None:
        return False
    try:
        return bool(accept(prefix))
    except Exception:  # some magic checks unpack a fixed-size header and fail on short data
        return False


def _finish(image: Image.Image, limits: ImageInputConfig, owned: bool) -> LoadedImage:
    try:
        # Apply the EXIF orientation tag, as cameras store pixels unrotated; a caller's image is not modified.
        if owned:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
        rgb = convert_to_rgb(image)
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError(f"cannot decode image: {exc}") from exc
    rgb = shrink_to_fit(rgb, limits.max_image_size)
    return LoadedImage(image=rgb, hash=image_content_hash(rgb))


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' ``convert_to_rgb`` makes it: transparency composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"cannot convert image mode {image.mode} to RGB: {exc}") from exc


def shrink_to_fit(image: Image.Image, max_size: int) -> Image.Image:
    new_size = fitted_size(image.size, max_size)
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


def fitted_size(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` after ``shrink_to_fit``."""
    width, height = size
    longest = max(width, height)
    if longest <= max_size:
        return size
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_content_hash(image: Image.Image) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# --- remote fetching ------------------------------------------------------------------------------------------


async def fetch_image_bytes(url: str, limits: ImageInputConfig) -> bytes:
    """GET an http(s) image URL within the byte limit and the fetch timeout, refusing hosts on
    loopback/private/link-local/reserved/multicast addresses unless allowed_image_hosts names them."""
    if not limits.allow_remote_images:
        raise _remote_disabled()
    try:
        return await asyncio.wait_for(_fetch(url, limits), timeout=limits.image_fetch_timeout)
    except asyncio.TimeoutError as exc:
        raise ImageInputError(f"fetching image from {url} timed out after {limits.image_fetch_timeout}s") from exc


async def _fetch(url: str, limits: ImageInputConfig) -> bytes:
    current = _parse_http_url(url)
    async with _http_client(limits) as client:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = await _resolve_checked(current, limits)
            response = await _connect_pinned(client, current, addresses)
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    try:
                        current = _parse_http_url(str(current.join(location)))
                    except httpx.InvalidURL as exc:
                        raise ImageInputError(f"image URL redirected to an invalid URL {location!r}") from exc
                    continue
                if not 200 <= response.status_code < 300:
                    raise ImageInputError(f"fetching image from {current} failed: HTTP {response.status_code}")
                return await _read_body(response, current, limits)
            finally:
                await response.aclose()
    raise ImageInputError(f"fetching image from {url}: more than {MAX_REDIRECTS} redirects")


def _http_client(limits: ImageInputConfig) -> httpx.AsyncClient:
    # No environment proxies or netrc credentials for user-chosen URLs; redirects are followed by hand
    # so that every hop's host is checked.
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=limits.image_fetch_timeout,
                             headers={"accept": "image/*", "accept-encoding": "identity",
                                      "user-agent": "streamvlm"})


def _parse_http_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ImageInputError(f"invalid image URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageInputError(f"unsupported image URL scheme {parsed.scheme!r} in {url!r}; only http(s) "
                              "can be fetched")
    if not parsed.host:
        raise ImageInputError(f"image URL has no host: {url!r}")
    return parsed


async def _resolve_checked(url: httpx.URL, limits: ImageInputConfig) -> list[str]:
    """The URL host's addresses, each checked against the private-network policy."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageInputError(f"cannot resolve image host {host!r}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageInputError(f"cannot resolve image host {host!r}: no addresses")
    host_allowed = _host_in_allowlist(url, limits.allowed_image_hosts)
    for address in addresses:
        ip = ipaddress.ip_address(address)
        problem = blocked_address_reason(ip)
        if problem and not host_allowed and not _address_in_allowlist(ip, limits.allowed_image_hosts):
            shown = host if host == address else f"{host} ({address})"
            raise ImageInputError(f"refusing to fetch image from {shown}: {address} is a {problem} address "
                                  "(add the host to allowed_image_hosts to allow it)")
    return addresses


async def _connect_pinned(client: httpx.AsyncClient, url: httpx.URL, addresses: list[str]) -> httpx.Response:
    """Send the request to an address that was checked, not to a fresh DNS answer (DNS rebinding).

    The URL's host moves to the Host header and, for https, to the TLS SNI name, against which the
    certificate is still verified. The addresses are tried in order, as a resolving client would.
    """
    headers = {"host": url.netloc.decode("ascii")}
    extensions: dict[str, Any] = {}
    if url.scheme == "https":
        extensions["sni_hostname"] = url.raw_host.decode("ascii")
    error: Exception | None = None
    for address in addresses:
        try:
            request = client.build_request("GET", url.copy_with(host=address), headers=headers,
                                           extensions=extensions)
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            error = exc
        except httpx.TimeoutException as exc:
            raise ImageInputError(f"fetching image from {url} timed out: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageInputError(f"cannot fetch image from {url}: {exc}") from exc
    raise ImageInputError(f"cannot connect to image host {url.host}: {error}")


async def _read_body(response: httpx.Response, url: httpx.URL, limits: ImageInputConfig) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Decompressing would let a small body inflate past the byte limit inside a single chunk.
        raise ImageInputError(f"image from {url} came with Content-Encoding {encoding!r}; only identity is "
                              "accepted")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit():
        _check_byte_count(int(declared), limits, f"image at {url} (Content-Length)")
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            _check_byte_count(len(body), limits, f"image download from {url} (so far)")
    except httpx.TimeoutException as exc:
        raise ImageInputError(f"fetching image from {url} timed out: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ImageInputError(f"cannot fetch image from {url}: {exc}") from exc
    return bytes(body)


# --- address policy -------------------------------------------------------------------------------------------


def blocked_address_reason(address: IPAddress) -> str | None:
    """Why an address may not be fetched by default (``"loopback"``, ``"private"``, ...), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_address_reason(embedded)
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("reserved", address.is_reserved), ("private", address.is_private),
              ("non-global", not address.is_global))
    return next((name for name, hit in checks if hit), None)


def _host_in_allowlist(url: httpx.URL, allowed: tuple[str, ...]) -> bool:
    names = {normalize_host(url.host), normalize_host(url.raw_host.decode("ascii"))}
    return any(name in allowed for name in names)


def _address_in_allowlist(address: IPAddress, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue  # a host name, matched by _host_in_allowlist
        if address.version == network.version and address in network:
            return True
    return False
