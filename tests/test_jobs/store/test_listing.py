"""``verify``'s listings of the artifact folders, read a page at a time and kept as hashes, on
local disk and on a real S3 endpoint: what they show, the strays named from a second listing,
and what a running job stores or commits while they are read."""

from __future__ import annotations

from collections import Counter

from helpers import committed_output, s3_requests

from jobs.store import listing, manifest
from jobs.verify import verify
from rendering import storage


def test_a_folder_is_listed_a_page_at_a_time(place):
    """Pages of at most 1,000 entries, each with its size (None: a subfolder); on S3 a page is
    one LIST request."""
    fs, root = storage.filesystem(f"{place}/paged")
    videos = storage.join(root, "videos")
    objects = {storage.join(videos, f"v{i:04d}.mp4"): b"x" * (i % 7) for i in range(1001)}
    fs.makedirs(storage.join(videos, "keyframes"), exist_ok=True)
    fs.pipe({**objects, storage.join(videos, "keyframes", "k.png"): b"y"})
    if place.startswith("s3://"):
        made = s3_requests(fs)
    pages = list(listing.pages(fs, videos))
    assert [len(page) <= 1000 for page in pages] == [True] * 2
    assert sorted(entry for page in pages for entry in page) == sorted(
        [*((path, len(data)) for path, data in objects.items()),
         (storage.join(videos, "keyframes"), None)])
    if place.startswith("s3://"):
        assert Counter(operation for operation, _ in made) == Counter(ListObjectsV2=2)


def _damaged(out: str, rows: list[dict]) -> list[str]:
    """Damage ``out`` as a test of each kind of problem does; the problems verify must find."""
    fs, root = storage.filesystem(out)
    fs.rm(storage.join(root, rows[3]["video_uri"]))
    fs.makedirs(storage.join(root, "stages", "keyframe"), exist_ok=True)
    fs.pipe({storage.join(root, rows[4]["video_uri"]): b"cut",
             storage.join(root, "videos", "stranger.mp4"): b"not ours",
             storage.join(root, "videos", ".late.mp4.tmp-1"): b"half",
             storage.join(root, "stages", "keyframe", "orphan.png"): b"not ours"})
    at = storage.to_uri(fs, root)
    return [f"video of row 'row-00003' is missing: {at}/videos/row-00003.mp4",
            f"video of row 'row-00004' has 3 bytes, manifest says {rows[4]['bytes']}: "
            f"{at}/videos/row-00004.mp4",
            f"leftover temporary object {storage.join(root, 'videos', '.late.mp4.tmp-1')}",
            f"object {storage.join(root, 'stages', 'keyframe', 'orphan.png')} is not in any "
            f"manifest",
            f"video {storage.join(root, 'videos', 'stranger.mp4')} is not in any manifest"]


def test_what_verify_finds_is_the_same_taken_in_small_chunks(place, monkeypatch):
    """A listing is taken in a chunk at a time (64k objects): with chunks of 7, every damage is
    found as with one, and the strays (named from a second listing) are exactly the objects
    no manifest lists."""
    out = f"{place}/chunked"
    expected = _damaged(out, committed_output(out, 40, shard_size=8))
    monkeypatch.setattr(listing, "CHUNK", 7)
    assert verify(out, check_hashes=False).problems == expected


def test_what_a_running_job_stores_or_commits_while_verify_lists(place, monkeypatch):
    """The rows to check are fixed before the folders are listed: a row committed while they
    are listed is not checked, so never reported missing; its video, listed, is in no manifest
    read (as any video a running job stored but has not committed). A video stored after the
    listing, while the strays are named from a second one, was not listed: it is not one."""
    out = f"{place}/running"
    rows = committed_output(out, 20, shard_size=8)
    fs, root = storage.filesystem(out)
    fs.pipe({storage.join(root, "videos", "stranger.mp4"): b"not ours"})
    videos, listings = storage.join(root, "videos"), []
    pages = listing.pages

    def meanwhile(fs, folder):
        if folder == videos:
            listings.append(folder)
            late = {**rows[0], "id": f"late-{len(listings)}", "row_index": 19 + len(listings),
                    "video_uri": f"videos/late-{len(listings)}.mp4"}
            late["artifacts"] = [{**rows[0]["artifacts"][0], "path": late["video_uri"]}]
            fs.pipe({storage.join(root, late["video_uri"]): b"video of row 0"})
            if len(listings) == 1:
                manifest.write_shard(out, [late])
        return pages(fs, folder)

    monkeypatch.setattr(listing, "pages", meanwhile)
    audit = verify(out, check_hashes=False)
    assert len(listings) == 2 and audit.rows == 20
    assert audit.problems == [
        f"video {storage.join(videos, name)} is not in any manifest"
        for name in ("late-1.mp4", "stranger.mp4")]
    monkeypatch.setattr(listing, "pages", pages)
    assert verify(out).problems == [f"video {storage.join(videos, 'late-2.mp4')} is not in any "
                                    f"manifest", f"video {storage.join(videos, 'stranger.mp4')} "
                                    f"is not in any manifest"]
