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


def test_eight_concurrent_sessions_on_loopback(app_server, study_files, artifacts_dir: Path) -> None:
    studies = study_files.other_niftis[:SESSIONS]
    assert len(studies) == SESSIONS
    log_before = len(app_server.log_text())
    started = time.perf_counter()
    with PeakRss(app_server.process.pid) as rss, ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(lambda args: run_session(app_server.url, *args), zip(studies, range(SESSIONS))))
    wall = time.perf_counter() - started

    for result in results:
        assert "Study loaded" in result["load_status"], result["load_status"]
        assert "Answered in" in result["answer_status"], result["answer_status"]
        user, assistant = result["chat"]
        assert message_text(user) == result["question"], "a session saw another session's conversation"
        assert assistant["role"] == "assistant" and message_text(assistant).strip()
    montages = {result["montage"] for result in results}
    assert len(montages) == SESSIONS, "sessions did not each see their own study"
    new_log = app_server.log_text()[log_before:]
    assert " ERROR " not in new_log and "Traceback" not in new_log, new_log[-2000:]

    figures = {
        "sessions": SESSIONS,
        "all_answered": True,
        "wall_s": round(wall, 2),
        "slowest_session_s": round(max(r["seconds"] for r in results), 2),
        "server_rss_baseline_mb": round(rss.baseline_mb, 1),
        "server_rss_peak_mb": round(rss.peak_mb, 1),
        "model": "tiny random (tests)",
        "slices_per_study": 4,
        "concurrency_limit": 2,
    }
    (artifacts_dir / "load_test.json").write_text(json.dumps(figures, indent=2))
    print("\nload test:", json.dumps(figures))
