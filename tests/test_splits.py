import hashlib

from multitag.layout import split_for


def _digest(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def test_split_depends_on_content_hash_only():
    d = _digest(7)
    assert split_for(d, 0.15, 0.2) == split_for(d, 0.15, 0.2)


def test_adding_images_never_moves_old_ones():
    old = {i: split_for(_digest(i), 0.15, 0.2) for i in range(2000)}
    new = {i: split_for(_digest(i), 0.15, 0.2) for i in range(5000)}  # 3,000 images added
    assert all(new[i] == s for i, s in old.items())


def test_split_fractions_are_respected():
    splits = [split_for(_digest(i), 0.15, 0.2) for i in range(20000)]
    assert abs(splits.count("test") / 20000 - 0.2) < 0.015
    assert abs(splits.count("val") / 20000 - 0.15) < 0.015
    assert abs(splits.count("train") / 20000 - 0.65) < 0.015
