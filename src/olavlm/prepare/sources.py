"""The dataset registry, as data: what to fetch, from where, how big, and where it ends up.

A moved URL or a re-uploaded hub file is a one-line change here. Every path is relative to the
``--root`` folder (``datasets/`` by convention). Nothing in this module touches the
network or the disk.

Vocabulary:

* a *remote* is one file somewhere: :class:`HttpFile` (plain URL) or :class:`HubFile` (a file of a
  Hugging Face dataset repo);
* a :class:`Fetch` says where that file is saved and, for archives, where it is unpacked and which
  folder must exist afterwards;
* a :class:`Source` is what ``--only NAME`` selects (e.g. ``coco`` of ``llava-665k``): some fetches,
  plus, for OCR-VQA, the per-image download (:class:`OcrVqaSpec`);
* a :class:`DatasetSpec` is one ``olavlm data prepare NAME`` target with its expected counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

DOWNLOADS = ".downloads"  # archives are saved under <root>/.downloads/ (deletable after unpacking)
STATE = ".olavlm-prepare"  # <root>/.olavlm-prepare/ holds the done-markers of downloads and unpacks
TEXT_ONLY = "text-only"  # per-source key of records without an image


@dataclass(frozen=True)
class HttpFile:
    """A file behind a plain HTTP(S) URL."""

    url: str | None  # direct download URL; None = cannot be fetched automatically (see `note`)
    size: int | None = None  # expected size in bytes; None = learned from the server's Content-Length
    checksum: str | None = None  # "md5:<hex>" or "sha256:<hex>"; None = size check only
    note: str = ""  # provenance, or how to obtain the file by hand when `url` is None
    redirect_hosts: tuple[str, ...] = ()  # CDN hosts a redirect may lead to besides the URL's own (".x.org" = subdomains)


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face Hub *dataset* repository (fetched with huggingface_hub)."""

    repo_id: str  # "owner/name" of the dataset repo
    filename: str  # path of the file inside the repo
    revision: str = "main"  # branch, tag or commit; pin a commit for reproducibility
    size: int | None = None  # expected size in bytes; None = taken from the hub's metadata
    checksum: str | None = None  # "sha256:<hex>"; None = the hub's LFS etag (a sha256) is used when present
    note: str = ""  # provenance


Remote = HttpFile | HubFile


@dataclass(frozen=True)
class Fetch:
    """One downloaded file and what becomes of it."""

    remote: Remote  # where it comes from
    save_as: str  # where the downloaded file lives, relative to root (a hub file must end with its repo path)
    unpack_to: str | None = None  # archive: folder (relative to root) to unpack into; None = keep the file as is
    expect: tuple[str, ...] = ()  # folders/files (relative to root) that must exist after unpacking
    flatten: bool = False  # unpack every member into `unpack_to` directly, dropping its folders (`unzip -j`)
    expected_files: int | None = None  # number of files the archive holds, when published (informational)
    max_unpacked_bytes: int | None = None  # bound on the unpacked total; None = archive.unpack_limit(archive size)

    def __post_init__(self) -> None:
        if isinstance(self.remote, HubFile):
            if self.save_as != self.remote.filename and not self.save_as.endswith("/" + self.remote.filename):
                raise ValueError(
                    f"hub file {self.remote.repo_id}:{self.remote.filename}: save_as {self.save_as!r} must end with "
                    "the file's path in the repo (huggingface_hub mirrors the repo layout under its local_dir)"
                )
        if self.expect and self.unpack_to is None:
            raise ValueError(f"{self.save_as}: `expect` is only meaningful for archives (set unpack_to)")

    @property
    def local_dir(self) -> str:
        """Folder (relative to root) that huggingface_hub mirrors the repo into (hub files only)."""
        assert isinstance(self.remote, HubFile)
        return self.save_as[: len(self.save_as) - len(self.remote.filename)].rstrip("/") or "."


@dataclass(frozen=True)
class OcrVqaSpec:
    """OCR-VQA: images fetched one by one from the URLs listed in the OCR-VQA ``dataset.json``."""

    dataset_json: str  # where the OCR-VQA dataset.json lives (relative to root); fetched by an earlier Fetch or by hand
    image_dir: str  # folder the images are written to (relative to root), named "<key>.jpg"
    referenced_by: str | None  # LLaVA json (relative to root) whose image paths select the images to fetch; None = all
    image_prefix: str  # prefix of those paths, e.g. "ocr_vqa/images/"; the rest is the file name
    url_field: str = "imageURL"  # field of a dataset.json record that holds the image URL
    redirect_hosts: tuple[str, ...] = ()  # hosts an image URL may redirect to besides its own (".x.org" = subdomains)
    report: str = "ocr_vqa/download_report.json"  # dead links and the samples they affect (relative to root)


@dataclass(frozen=True)
class HubListSpec:
    """Files of a hub dataset repo named in a downloaded JSON-lines file (one hub request per file)."""

    repo_id: str  # "owner/name" of the dataset repo
    revision: str  # the commit the listing was fetched at (the files must come from the same one)
    listing: str  # the JSON-lines file (relative to root) whose `field` names the files
    field: str  # record field holding a repo-relative path, e.g. "filename"
    local_dir: str  # folder (relative to root) the repo layout is mirrored into


@dataclass(frozen=True)
class AssembleSpec:
    """Concatenate LLaVA-format json lists into one file whose image paths are relative to `image_folder`."""

    parts: tuple[tuple[str, str], ...]  # (json relative to root, folder its images live in, relative to image_folder)
    output: str  # assembled json, relative to root
    image_folder: str  # the folder training uses as data.image_folder, relative to root


@dataclass(frozen=True)
class Source:
    """What `--only NAME` selects."""

    name: str  # selector, unique within its dataset
    description: str  # one line for `--dry-run` and the report
    fetches: tuple[Fetch, ...] = ()  # files to download (and unpack)
    ocr_vqa: OcrVqaSpec | None = None  # per-image download step (OCR-VQA only)
    hub_files: HubListSpec | None = None  # per-file hub download step (files listed in a fetched jsonl)
    optional: bool = False  # prepared only when named in --only (alternatives, mirrors)


@dataclass(frozen=True)
class DatasetSpec:
    """One `olavlm data prepare NAME` target."""

    name: str  # the NAME on the command line
    sources: tuple[Source, ...]  # in the order they are prepared
    data_file: str  # the LLaVA json training reads (data.train_file), relative to root
    image_folder: str  # data.image_folder for this json, relative to root
    expected_records: int | None  # published record count of data_file
    expected_per_source: dict[str, int] = field(default_factory=dict)  # top folder of the image path (or TEXT_ONLY) -> records
    assemble: AssembleSpec | None = None  # build data_file from several jsons (ALLaVA)
    note: str = ""  # caveats printed with the report
    evaluation: bool = False  # a benchmark (not selected by NAME=all; data_file is not LLaVA json)
    counter: str | None = None  # "module:function" counting data_file's records (benchmarks); None = LLaVA json

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no source {name!r} (sources: {', '.join(s.name for s in self.sources)})")

    def map_remotes(self, fn: Callable[[Remote], Remote]) -> DatasetSpec:
        """A copy with every remote replaced by ``fn(remote)`` (mirrors, tests)."""
        sources = tuple(
            dataclasses.replace(s, fetches=tuple(dataclasses.replace(f, remote=fn(f.remote)) for f in s.fetches))
            for s in self.sources
        )
        return dataclasses.replace(self, sources=sources)


def _archive(name: str, remote: Remote, unpack_to: str, expect: tuple[str, ...], **kw) -> Fetch:
    """An archive saved under <root>/.downloads/<name>/ and unpacked into `unpack_to`."""
    if isinstance(remote, HubFile):
        save_as = f"{DOWNLOADS}/{name}/{remote.filename}"
    else:
        save_as = f"{DOWNLOADS}/{name}/{remote.url.rsplit('/', 1)[-1]}"  # type: ignore[union-attr]
    return Fetch(remote=remote, save_as=save_as, unpack_to=unpack_to, expect=expect, **kw)


# ------------------------------------------------------------------------------------------------
# LLaVA-558K (PT data): hub dataset liuhaotian/LLaVA-Pretrain
# ------------------------------------------------------------------------------------------------

LLAVA_PRETRAIN = DatasetSpec(
    name="llava-pretrain",
    sources=(
        Source(
            name="annotations",
            description="blip_laion_cc_sbu_558k.json (558,128 one-turn caption records)",
            fetches=(
                Fetch(HubFile("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json"),
                      save_as="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"),
            ),
        ),
        Source(
            name="images",
            description="images.zip -> LLaVA-Pretrain/images/<5-digit shard>/<id>.jpg",
            fetches=(
                # the zip has no root folder: its members are the shard folders themselves
                _archive("LLaVA-Pretrain", HubFile("liuhaotian/LLaVA-Pretrain", "images.zip"),
                         unpack_to="LLaVA-Pretrain/images", expect=("LLaVA-Pretrain/images",)),
            ),
        ),
    ),
    data_file="LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
    image_folder="LLaVA-Pretrain/images",
    expected_records=558_128,
)

# ------------------------------------------------------------------------------------------------
# LLaVA-665K (IFT data): the json from liuhaotian/LLaVA-Instruct-150K + five image sources
# ------------------------------------------------------------------------------------------------

# Records per top folder of the image path, counted on the released llava_v1_5_mix665k.json;
# they sum to 665,298.
LLAVA_665K_PER_SOURCE = {
    "coco": 364_100,
    "gqa": 72_140,
    "ocr_vqa": 80_000,
    "textvqa": 21_953,
    "vg": 86_417,
    TEXT_ONLY: 40_688,
}

LLAVA_665K = DatasetSpec(
    name="llava-665k",
    sources=(
        Source(
            name="annotations",
            description="llava_v1_5_mix665k.json (665,298 records, 40,688 text-only)",
            fetches=(Fetch(HubFile("liuhaotian/LLaVA-Instruct-150K", "llava_v1_5_mix665k.json"),
                           save_as="llava_v1_5_mix665k.json"),),
        ),
        Source(
            name="coco",
            description="COCO train2017 -> coco/train2017 (118,287 images)",
            fetches=(
                _archive("coco", HttpFile("http://images.cocodataset.org/zips/train2017.zip", size=19_336_861_798,
                                          checksum="md5:cced6f7f71b7629ddf16f17bbcfab6b2",
                                          note="official COCO 2017 train images"),
                         unpack_to="coco", expect=("coco/train2017",), expected_files=118_287),
            ),
        ),
        Source(
            name="gqa",
            description="GQA images -> gqa/images (148,854 images)",
            fetches=(
                _archive("gqa", HttpFile("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip",
                                         note="GQA v1.2 images (zip root: images/)"),
                         unpack_to="gqa", expect=("gqa/images",), expected_files=148_854),
            ),
        ),
        Source(
            name="textvqa",
            description="TextVQA train_val images -> textvqa/train_images (25,119 images)",
            fetches=(
                # unpacks train_images/ (not text_vqa/ as the reference's training docs create): the 665K json says textvqa/train_images/...
                _archive("textvqa", HttpFile("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip",
                                             note="TextVQA 0.5.1 train+val images (zip root: train_images/)"),
                         unpack_to="textvqa", expect=("textvqa/train_images",), expected_files=25_119),
            ),
        ),
        Source(
            name="vg",
            description="Visual Genome parts 1 and 2 -> vg/VG_100K, vg/VG_100K_2 (64,346 + 43,903 images)",
            fetches=(
                _archive("vg", HttpFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip",
                                        note="Visual Genome v1.2 part 1 (zip root: VG_100K/)"),
                         unpack_to="vg", expect=("vg/VG_100K",), expected_files=64_346),
                _archive("vg", HttpFile("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip",
                                        note="Visual Genome v1.2 part 2 (zip root: VG_100K_2/)"),
                         unpack_to="vg", expect=("vg/VG_100K_2",), expected_files=43_903),
            ),
        ),
        Source(
            name="ocr_vqa",
            description="OCR-VQA book covers fetched one by one from dataset.json URLs -> ocr_vqa/images/<id>.jpg",
            fetches=(
                Fetch(HttpFile(
                    url=None,
                    note="The LLaVA docs publish OCR-VQA's dataset.json (with loadDataset.py) in the Google Drive "
                         "folder https://drive.google.com/drive/folders/1_GYPY5UkUy7HIcR0zq3ZCFgeZN7BAfm_ , which "
                         "plain HTTP cannot fetch. Download dataset.json from there (or https://ocr-vqa.github.io/) "
                         "and place it at <root>/ocr_vqa/dataset.json, then run prepare again. Many of its image "
                         "URLs are dead: `--only ocr_vqa_mirror ocr_vqa` first unpacks a community zip of the "
                         "images LLaVA used, then fetches only what is still missing."),
                      save_as="ocr_vqa/dataset.json"),
            ),
            ocr_vqa=OcrVqaSpec(dataset_json="ocr_vqa/dataset.json", image_dir="ocr_vqa/images",
                               referenced_by="llava_v1_5_mix665k.json", image_prefix="ocr_vqa/images/",
                               # dataset.json points at Amazon's image hosts, which move images between them
                               redirect_hosts=(".images-amazon.com", ".ssl-images-amazon.com", ".media-amazon.com")),
        ),
        Source(
            name="ocr_vqa_mirror",
            description="optional: a zip of the OCR-VQA images LLaVA used (most dataset.json URLs are dead)",
            fetches=(
                # layout inside the zip is not published; flattening puts every <key>.jpg where the json expects it
                _archive("ocr_vqa", HubFile("weizhiwang/llava_v15_instruction_images", "ocr_vqa_images_llava_v15.zip",
                                            note="community mirror announced in haotian-liu/LLaVA PR #1458"),
                         unpack_to="ocr_vqa/images", expect=("ocr_vqa/images",), flatten=True),
            ),
            optional=True,
        ),
    ),
    data_file="llava_v1_5_mix665k.json",
    image_folder=".",
    expected_records=665_298,
    expected_per_source=LLAVA_665K_PER_SOURCE,
)

# ------------------------------------------------------------------------------------------------
# ALLaVA-Caption (VPT data): LAION + VFLAN caption subsets of FreedomIntelligence/ALLaVA-4V
# ------------------------------------------------------------------------------------------------

ALLAVA_REPO = "FreedomIntelligence/ALLaVA-4V"

ALLAVA_CAPTION = DatasetSpec(
    name="allava-caption",
    sources=(
        Source(
            name="laion",
            description="ALLaVA-Caption-LAION-4V.json + 10 image chunks -> allava/allava_laion/images/",
            fetches=(
                Fetch(HubFile(ALLAVA_REPO, "allava_laion/ALLaVA-Caption-LAION-4V.json"),
                      save_as="allava/allava_laion/ALLaVA-Caption-LAION-4V.json"),
                # ALLaVA's download_laion.sh unpacks each chunk with `unzip -j` (flat) into allava_laion/images/
                *(
                    _archive("allava", HubFile(ALLAVA_REPO, f"allava_laion/image_chunks/images_{i}.zip"),
                             unpack_to="allava/allava_laion/images", expect=("allava/allava_laion/images",),
                             flatten=True)
                    for i in range(10)
                ),
            ),
        ),
        Source(
            name="vflan",
            description="ALLaVA-Caption-VFLAN-4V.json + Vision-FLAN 191-task images -> allava/allava_vflan/images/",
            fetches=(
                Fetch(HubFile(ALLAVA_REPO, "allava_vflan/ALLaVA-Caption-VFLAN-4V.json"),
                      save_as="allava/allava_vflan/ALLaVA-Caption-VFLAN-4V.json"),
                # ALLaVA's download_vflan.sh unpacks it inside allava_vflan/images/ (zip root: images_191task_1k/)
                _archive("vision-flan", HubFile("Vision-Flan/vision-flan_191-task_1k", "image_191-task_1k.zip"),
                         unpack_to="allava/allava_vflan/images",
                         expect=("allava/allava_vflan/images/images_191task_1k",)),
            ),
        ),
    ),
    data_file="allava/ALLaVA-Caption.json",
    image_folder="allava",
    expected_records=505_588 + 202_552,
    expected_per_source={"allava_laion": 505_588, "allava_vflan": 202_552},
    assemble=AssembleSpec(
        parts=(("allava/allava_laion/ALLaVA-Caption-LAION-4V.json", "allava_laion/images"),
               ("allava/allava_vflan/ALLaVA-Caption-VFLAN-4V.json", "allava_vflan/images")),
        output="allava/ALLaVA-Caption.json",
        image_folder="allava",
    ),
    note="Expected counts are the ALLaVA README's (505,588 LAION + 202,552 VFLAN); the hub jsons were "
         "re-uploaded since, so a small difference is reported but is not an error.",
)

# ------------------------------------------------------------------------------------------------
# Benchmarks: CV-Bench and MMStar (read by `olavlm eval`, not by training)
# ------------------------------------------------------------------------------------------------

CVBENCH_REPO = "nyu-visionx/CV-Bench"
# the last commit with test.jsonl + the img/ folder it points at (later commits keep only parquet files)
CVBENCH_REVISION = "22409a927ab5cf68e3655023d51694587455fc99"

CV_BENCH = DatasetSpec(
    name="cv-bench",
    sources=(
        Source(
            name="test",
            description="test.jsonl (2,638 questions: 1,438 2D + 1,200 3D) and the images it lists -> CV-Bench/img/",
            fetches=(Fetch(HubFile(CVBENCH_REPO, "test.jsonl", revision=CVBENCH_REVISION),
                           save_as="CV-Bench/test.jsonl"),),
            hub_files=HubListSpec(CVBENCH_REPO, CVBENCH_REVISION, listing="CV-Bench/test.jsonl", field="filename",
                                  local_dir="CV-Bench"),
        ),
    ),
    data_file="CV-Bench/test.jsonl",
    image_folder="CV-Bench",
    expected_records=2_638,
    evaluation=True,
    counter="olavlm.evaluation.cvbench:count_records",
)

MMSTAR = DatasetSpec(
    name="mmstar",
    sources=(
        Source(
            name="test",
            description="MMStar.tsv (1,500 questions, images base64-encoded in the file)",
            fetches=(Fetch(HubFile("Lin-Chen/MMStar", "MMStar.tsv"), save_as="MMStar/MMStar.tsv"),),
        ),
    ),
    data_file="MMStar/MMStar.tsv",
    image_folder="MMStar",
    expected_records=1_500,
    evaluation=True,
    counter="olavlm.evaluation.mmstar:count_records",
)

DATASETS: dict[str, DatasetSpec] = {d.name: d for d in (LLAVA_PRETRAIN, LLAVA_665K, ALLAVA_CAPTION, CV_BENCH, MMSTAR)}
ALL = "all"  # NAME that selects every training dataset above (benchmarks are prepared by name)
