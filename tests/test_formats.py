"""Every annotation format loads the same dataset into the same manifest and multi-hot matrix,
and the ingest-level rules (fixed vocabulary, strict, rejected fraction) hold."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitag.config import IngestParams
from multitag.errors import IngestError
from multitag.ingest import ingest
from multitag.labels import make_labels
from multitag.layout import Layout

LABELS = {"a.png": ["cat", "dog"], "b.png": ["dog"], "c.png": [], "d.png": ["car", "cat"], "e.png": ["car"]}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(LABELS):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _tags_csv(d, sep=" ", quote=False, no_label=None, header=("image_name", "tags"), ext=True):
    with (d / "ann.csv").open("w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL if quote else csv.QUOTE_MINIMAL)
        w.writerow(header)
        for name, tags in LABELS.items():
            w.writerow([name if ext else name[:-4], sep.join(tags) if tags else (no_label or "")])
    return d / "ann.csv"


def _multihot(d):
    vocab = sorted({t for tags in LABELS.values() for t in tags})
    rows = [[name, *[int(v in tags) for v in vocab]] for name, tags in LABELS.items()]
    pd.DataFrame(rows, columns=["image_name", *vocab]).to_csv(d / "ann.csv", index=False)
    return d / "ann.csv"


def _jsonl(d, style):
    lines = []
    for name, tags in LABELS.items():
        if style == "plain":
            lines.append({"image": name, "labels": tags})
        elif style == "vertex":
            lines.append({"imageGcsUri": name, "classificationAnnotations": [{"displayName": t} for t in tags]})
        else:
            lines.append({"image_url": name, "label": tags})
    (d / "ann.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d / "ann.jsonl"


def _coco(d):
    cats = {"car": 3, "cat": 7, "dog": 42}  # non-contiguous ids
    images = [{"id": 10 + i, "file_name": n, "width": 24, "height": 20} for i, n in enumerate(LABELS)]
    anns = [{"id": k, "image_id": 10 + i, "category_id": cats[t], "bbox": [0, 0, 1, 1]}
            for k, (i, t) in enumerate((i, t) for i, tags in enumerate(LABELS.values()) for t in tags)]
    anns.append({"id": 99, "image_id": 10, "category_id": 7, "bbox": [1, 1, 1, 1]})  # a second cat
    (d / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                            "categories": [{"id": v, "name": k} for k, v in cats.items()]}))
    return d / "ann.json"


def _voc(d):
    root = d / "VOC"
    (root / "Annotations").mkdir(parents=True)
    for name, tags in LABELS.items():
        objs = "".join(f"<object><name>{t}</name><difficult>0</difficult></object>" for t in tags)
        if name == "b.png":
            objs += "<object><name>car</name><difficult>1</difficult></object>"  # ignored by default
        (root / "Annotations" / f"{name[:-4]}.xml").write_text(
            f"<annotation><filename>{name}</filename>{objs}</annotation>")
    return root


def _voc_imagesets(d):
    root = d / "VOC"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for label in ("car", "cat", "dog"):
        for split, names in (("train", ["a.png", "b.png", "c.png"]), ("val", ["d.png", "e.png"])):
            (root / "ImageSets" / "Main" / f"{label}_{split}.txt").write_text("".join(
                f"{n[:-4]} {'1' if label in LABELS[n] else '0' if n == 'c.png' else '-1'}\n" for n in names))
    return root


WRITERS = {
    "tags_csv": lambda d: (_tags_csv(d), {}),
    "tags_csv_pipe_no_finding": lambda d: (_tags_csv(d, "|", no_label="No Finding",
                                                     header=("Image Index", "Finding Labels")),
                                           {"delimiter": "|", "no_label": "No Finding",
                                            "image_column": "Image Index", "tags_column": "Finding Labels"}),
    "tags_csv_quoted_commas": lambda d: (_tags_csv(d, ",", quote=True), {"delimiter": ","}),
    "tags_csv_semicolon_no_ext": lambda d: (_tags_csv(d, ";", quote=True, ext=False), {"delimiter": ";"}),
    "multihot_csv": lambda d: (_multihot(d), {}),
    "jsonl": lambda d: (_jsonl(d, "plain"), {}),
    "jsonl_vertex": lambda d: (_jsonl(d, "vertex"), {}),
    "jsonl_azure": lambda d: (_jsonl(d, "azure"), {}),
    "coco": lambda d: (_coco(d), {}),
    "voc": lambda d: (_voc(d), {}),
    "voc_imagesets": lambda d: (_voc_imagesets(d), {}),  # c.png marked difficult (0): ignored
}


def _load(tmp_path, images, kind):
    d = tmp_path / kind
    d.mkdir(parents=True)
    ann, extra = WRITERS[kind](d)
    p = IngestParams(annotations=str(ann), images=str(images), image_size=8, **extra)
    ws = Layout(d)
    result = ingest(p, ws)
    make_labels(ws)
    return result, pd.read_parquet(ws.manifest), json.loads(ws.vocabulary.read_text())["labels"], np.load(ws.targets)


def test_every_format_gives_the_same_manifest_and_targets(tmp_path, images):
    _, ref_manifest, ref_vocab, ref_y = _load(tmp_path / "ref", images, "tags_csv")
    assert ref_vocab == ["car", "cat", "dog"] and ref_y.sum() == 6 and len(ref_manifest) == 5
    for kind in WRITERS:
        result, manifest, vocab, y = _load(tmp_path, images, kind)
        assert result.rejected == 0, kind
        assert result.format == kind.split("_")[0] + ("_csv" if "csv" in kind else ""), kind
        cols = ["id", "sha256", "split", "shard", "offset"]
        pd.testing.assert_frame_equal(manifest[cols], ref_manifest[cols], obj=kind)
        assert manifest["tags"].map(list).tolist() == ref_manifest["tags"].map(list).tolist(), kind
        assert vocab == ref_vocab, kind
        np.testing.assert_array_equal(y, ref_y, err_msg=kind)


def _csv(tmp_path, rows, **kw):
    ann = tmp_path / "a.csv"
    ann.write_text("image_name,tags\n" + "\n".join(rows) + "\n")
    return IngestParams(annotations=str(ann), images=str(tmp_path / "images"), image_size=8, **kw)


def _issues(tmp_path):
    with Layout(tmp_path).ingest_issues.open() as f:
        return {r["image"]: r["reason"] for r in csv.DictReader(f)}


def test_fixed_vocabulary_rejects_unknown_labels(tmp_path, images):
    p = _csv(tmp_path, ["a.png,cat dog", "b.png,dog", "d.png,car cat", "e.png,bird"],
             allowed_labels=["car", "cat", "dog"])
    result = ingest(p, Layout(tmp_path))
    assert result.accepted == 3 and "unknown label(s) ['bird']" in _issues(tmp_path)["e.png"]


def test_case_and_space_variants(tmp_path, images):
    p = _csv(tmp_path, ["a.png,  cat   dog ", "b.png,Dog"])
    result = ingest(p, Layout(tmp_path))
    assert result.label_warnings == ["labels ['Dog', 'dog'] differ only by case: kept apart (labels are case-sensitive)"]
    tags = pd.read_parquet(Layout(tmp_path).manifest).set_index("source")["tags"].map(list)
    assert tags["a.png"] == ["cat", "dog"]  # surrounding spaces never make a new label
    assert tags["b.png"] == ["Dog"]  # labels are case-sensitive: 'Dog' and 'dog' are two labels


def test_strict_mode_fails_on_any_rejection(tmp_path, images):
    p = _csv(tmp_path, ["a.png,cat", "missing.png,dog", "b.png,dog"], strict=True)
    with pytest.raises(IngestError, match=r"ingest.strict: 1 of 3 records rejected.*line 3 missing.png"):
        ingest(p, Layout(tmp_path))
    assert "missing.png" in _issues(tmp_path)  # the report is written before failing


def test_too_many_rejections_mean_a_wrong_setting(tmp_path, images):
    p = _csv(tmp_path, ["a.png,cat", "x.png,dog", "y.png,dog", "z.png,dog"], max_rejected_fraction=0.5)
    with pytest.raises(IngestError, match=r"3 of 4 records rejected, more than ingest.max_rejected_fraction"):
        ingest(p, Layout(tmp_path))


def test_byte_order_mark_is_accepted(tmp_path, images):
    ann = tmp_path / "bom.csv"
    ann.write_bytes("\ufeffimage_name,tags\na.png,cat\n".encode("utf-8"))
    result = ingest(IngestParams(annotations=str(ann), images=str(images), image_size=8), Layout(tmp_path))
    assert result.accepted == 1


def test_malformed_json_lines_and_coco_categories(tmp_path, images):
    (tmp_path / "a.jsonl").write_text('{"image": "a.png", "labels": ["cat"]}\n{not json\n{"labels": ["x"]}\n')
    ingest(IngestParams(annotations=str(tmp_path / "a.jsonl"), images=str(images), image_size=8,
                        max_rejected_fraction=1), Layout(tmp_path))
    with Layout(tmp_path).ingest_issues.open() as f:
        reasons = {r["record"]: r["reason"] for r in csv.DictReader(f)}
    assert "malformed JSON record" in reasons["line 2"] and "no image field" in reasons["line 3"]

    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 1, "category_id": 5}], "categories": [{"id": 4, "name": "cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ingest(IngestParams(annotations=str(tmp_path / "c.json"), images=str(images), image_size=8,
                        max_rejected_fraction=1), Layout(tmp_path / "2"))
    with Layout(tmp_path / "2").ingest_issues.open() as f:
        assert "unknown category_id 5" in next(csv.DictReader(f))["reason"]
    with pytest.raises(IngestError, match="not a COCO instances file"):
        (tmp_path / "bad.json").write_text('{"images": []}')
        ingest(IngestParams(annotations=str(tmp_path / "bad.json"), images=str(images)), Layout(tmp_path / "3"))


def test_images_on_s3(tmp_path, images, s3_bucket):
    import boto3

    s3 = boto3.client("s3")
    for f in images.iterdir():
        s3.upload_file(str(f), s3_bucket, f"photos/{f.name}")
    _, local, _, _ = _load(tmp_path / "local", images, "tags_csv")
    ann = _tags_csv(tmp_path)
    with ann.open("a") as f:
        f.write("gone.png,cat\n")
    p = IngestParams(annotations=str(ann), images=f"s3://{s3_bucket}/photos", image_size=8)
    result = ingest(p, Layout(tmp_path))
    remote = pd.read_parquet(Layout(tmp_path).manifest)
    assert remote["sha256"].tolist() == local["sha256"].tolist() and result.rejected == 1
    assert f"image not found: s3://{s3_bucket}/photos/gone.png" in _issues(tmp_path)["gone.png"]
