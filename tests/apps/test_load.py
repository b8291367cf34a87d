"""Load test: 8 concurrent sessions, each asking about its own study, against one app on loopback.

Drives the app's HTTP API with ``gradio_client`` (one client = one browser session with its own
state). Reports the server's peak RSS; writes the figures to ``artifacts/apps/load_test.json``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

SESSIONS = 8


class PeakRss:
    """Samples a process's resident memory every 50 ms in a background thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline_mb = self.sample()
        self.peak_mb = self.baseline_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self.sample())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def message_text(message: dict) -> str:
    """Text of a chatbot message (Gradio 6 returns content as a list of typed parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def run_session(url: str, study: Path, index: int) -> dict:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    started = time.perf_counter()
    status, _summary, _slider, _view, montage, *_ = client.predict([handle_file(str(study))], "lung",
                                                                   api_name="/ct_upload")
    question = f"Session {index}: is there a lung nodule in this study?"
    chat, answer_status, _ = client.predict(question, api_name="/ct_ask")
    montage_digest = hashlib.sha256(Path(montage).read_bytes()).hexdigest()
    return {"index": index, "load_status": status, "montage": montage_digest, "chat": chat,
            "answer_status": answer_status, "question": question, "seconds": time.perf_counter() - started}


def load_test(server, studies: list[Path], slices: int, label: str, artifacts_dir: Path) -> dict:
    """Run SESSIONS concurrent sessions (one study each), check them all, return the figures."""
    assert len(studies) == SESSIONS
    log_before = len(server.log_text())
    started = time.perf_counter()
    with PeakRss(server.process.pid) as rss, ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(lambda args: run_session(server.url, *args), zip(studies, range(SESSIONS))))
    wall = time.perf_counter() - started

    for result in results:
        assert "Study loaded" in result["load_status"], result["load_status"]
        assert f"{slices} slices ready" in result["load_status"], result["load_status"]
        assert "Answered in" in result["answer_status"], result["answer_status"]
        user, assistant = result["chat"]
        assert message_text(user) == result["question"], "a session saw another session's conversation"
        assert assistant["role"] == "assistant" and message_text(assistant).strip()
    montages = {result["montage"] for result in results}
    assert len(montages) == SESSIONS, "sessions did not each see their own study"
    new_log = server.log_text()[log_before:]
    assert " ERROR " not in new_log and "Traceback" not in new_log, new_log[-2000:]

    figures = {
        "sessions": SESSIONS,
        "all_answered": True,
        "errors": 0,
        "wall_s": round(wall, 2),
        "slowest_session_s": round(max(r["seconds"] for r in results), 2),
        "server_rss_baseline_mb": round(rss.baseline_mb, 1),
        "server_rss_peak_mb": round(rss.peak_mb, 1),
        "model": "tiny random (tests)",
        "slices_per_study": slices,
        "concurrency_limit": 2,
    }
    (artifacts_dir / f"load_test_{label}.json").write_text(json.dumps(figures, indent=2))
    print(f"\nload test ({label}):", json.dumps(figures))
    return figures


def test_eight_concurrent_sessions_on_loopback(app_server, study_files, artifacts_dir: Path) -> None:
    load_test(app_server, study_files.other_niftis[:SESSIONS], 4, "small", artifacts_dir)


@pytest.mark.slow
def test_eight_concurrent_sessions_with_100_slices(app_server_factory, tmp_path: Path, artifacts_dir: Path) -> None:
    """The same with 100 slices per study (128 x 128 phantoms of 100-160 slices)."""
    from domain_data.synthetic.ct_phantom import make_ct_phantom, write_nifti

    studies = [write_nifti(make_ct_phantom(seed=200 + i, n_slices=100 + 8 * i, size=128), tmp_path / f"s{i}.nii.gz")
               for i in range(SESSIONS)]
    server = app_server_factory("--num-slices", "100")
    load_test(server, studies, 100, "100_slices", artifacts_dir)


def test_login_from_environment(app_server_factory, study_files) -> None:
    """With LONGLLAVA_APP_USER/PASSWORD set, the app answers only after a login."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AuthenticationError

    server = app_server_factory(env={"LONGLLAVA_APP_USER": "analyst", "LONGLLAVA_APP_PASSWORD": "pw-4471"})
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url, auth=("analyst", "wrong"), verbose=False)
    client = Client(server.url, auth=("analyst", "pw-4471"), verbose=False)
    status, *_ = client.predict([handle_file(str(study_files.nifti))], "lung", api_name="/ct_upload")
    assert "Study loaded" in status
