"""Fixtures for the app tests: a tiny random model, seeded studies/images, a live app server, a browser.

The server is a real ``longllava app`` process on loopback (stdout/stderr captured to a log file
so tests can search the logs for patient identifiers). Answers from the tiny random model are
noise, but every step of the flow is real. Screenshots go to ``artifacts/apps/`` (gitignored).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "apps"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Small caps so the tiny model answers in well under a second per question.
SERVER_LIMITS = ["--num-slices", "4", "--max-tiles", "4", "--max-new-tokens", "8", "--concurrency", "2",
                 "--max-upload-mb", "20"]

# Fake identifiers written into the DICOM headers of the privacy fixture.
FAKE_PATIENT_FIELDS = {
    "name": "Testpatient^Jolene^Q",
    "patient_id": "PID-7319-XQ",
    "birth_date": "19610417",
    "accession": "ACC-552081",
    "institution": "Saint Nowhere Test Hospital",
}


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    cache_dir: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class StudyFiles:
    nifti: Path
    other_niftis: list[Path]
    dicom_files: list[Path]
    dicom_zip: Path
    bad_file: Path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from longllava.loading import save_random_model

    return save_random_model("tiny", tmp_path_factory.mktemp("apps-model") / "tiny", seed=0)


def write_phantom_nifti(path: Path, seed: int) -> Path:
    from domain_data.synthetic.ct_phantom import make_ct_phantom, write_nifti

    return write_nifti(make_ct_phantom(seed=seed, n_slices=16, size=64), path)


def write_identified_dicom(folder: Path, seed: int) -> list[Path]:
    """A DICOM series of a phantom whose headers carry FAKE_IDENTIFIERS."""
    from domain_data.synthetic.ct_phantom import make_ct_phantom, write_dicom_series
    from domain_data.synthetic.dicom_writer import FakePatient

    phantom = make_ct_phantom(seed=seed, n_slices=16, size=64)
    series = write_dicom_series(phantom, folder, patient=FakePatient(**FAKE_PATIENT_FIELDS))
    return list(series.paths)


@pytest.fixture(scope="session")
def identifiers() -> set[str]:
    """Every spelling of the fake identifiers that must not appear anywhere (name parts too)."""
    variants: set[str] = set()
    for value in FAKE_PATIENT_FIELDS.values():
        variants |= {value, value.replace("^", " "), value.replace("^", ", ")}
    variants |= {part for part in FAKE_PATIENT_FIELDS["name"].split("^") if len(part) > 2}
    variants |= {"1961-04-17", "17.04.1961"}
    return variants


@pytest.fixture(scope="session")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    root = tmp_path_factory.mktemp("apps-studies")
    nifti = write_phantom_nifti(root / "chest_a.nii.gz", seed=11)
    others = [write_phantom_nifti(root / f"chest_{i}.nii.gz", seed=100 + i) for i in range(8)]
    dicom_files = write_identified_dicom(root / "dicom", seed=12)
    dicom_zip = root / "series.zip"
    with zipfile.ZipFile(dicom_zip, "w") as archive:
        for index, path in enumerate(dicom_files):
            archive.write(path, f"series/{index:03d}.dcm")
    bad = root / "broken_study.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00this is not a gzip stream nor a NIfTI volume" * 4)
    return StudyFiles(nifti, others, dicom_files, dicom_zip, bad)


@pytest.fixture(scope="session")
def raster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 3-band uint8 GeoTIFF in UTM (900 x 700 px at 10 m): bright squares on a textured field."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(5)
    height, width = 700, 900
    pixels = rng.integers(40, 90, size=(3, height, width), dtype=np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, height - 30), rng.integers(0, width - 30)
        pixels[:, y:y + 24, x:x + 24] = 230
    path = tmp_path_factory.mktemp("apps-raster") / "scene.tif"
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500_000, 4_200_000, 10, 10))
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(pixels)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app server not ready after {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def start_server(model_dir: Path, workdir: Path, extra: list[str] | None = None,
                 env_extra: dict[str, str] | None = None) -> AppServer:
    port = _free_port()
    log_path = workdir / "server.log"
    cache_dir = workdir / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGLLAVA_APP_")}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(workdir / "uploads"),
               **(env_extra or {}))
    command = [sys.executable, "-m", "longllava.cli", "app", "--model", str(model_dir), "--port", str(port),
               "--cache-dir", str(cache_dir), *SERVER_LIMITS, *(extra or [])]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_ready(url, process, log_path)
    except Exception:
        process.kill()
        raise
    return AppServer(url=url, process=process, log_path=log_path, cache_dir=cache_dir)


def stop_server(server: AppServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def app_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("apps-server"))
    yield server
    stop_server(server)


@pytest.fixture()
def app_server_factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Start extra servers with more CLI options; each is stopped after the test."""
    started: list[AppServer] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> AppServer:
        workdir = tmp_path_factory.mktemp("apps-server")
        started.append(start_server(tiny_model_dir, workdir, list(extra), env_extra=env))
        return started[-1]

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (install it with `make browser`, i.e. apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with playwright_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture()
def page(browser, app_server: AppServer):
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app_server.url)
    page.wait_for_selector("#ct-upload")
    yield page
    context.close()
