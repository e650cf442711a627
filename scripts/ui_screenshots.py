"""Screenshots of the MLflow UI after `main` on the tiny model, for the README (docs/ui/*.png).

Starts a local `mlflow server` on a fresh store in a temporary folder, runs `mlflow run <project>
-P model_id=builtin:tiny-phi3` against it, and photographs its pages with headless Chromium
(Debian: `apt-get install -y chromium`):

    python scripts/ui_screenshots.py                # writes docs/ui/*.png
    python scripts/ui_screenshots.py --keep         # and leaves the server running to look around
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
from phi3flow import local_server, settings  # noqa: E402

BIN = Path(sys.executable).parent
WINDOW = (1900, 1000)  # wide: MLflow 3.17 keeps its assistant panel open beside every page
EVAL_ROWS = 6  # a few prompts of the bundled set: enough for the tables, charts and traces
# The UI is a single-page app that fetches after the page loads: let it run this long before the shot.
SETTLE_MS = 20000
# MLflow 3.17 opens in its "GenAI" mode, whose sidebar has no model registry: the pages below ask for
# "Model training" (the same as clicking it at the top of the sidebar).
MODE = "workflowType=machine_learning"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        sys.exit("error: headless Chromium is needed: apt-get update && apt-get install -y chromium")
    return found


def screenshot(browser: str, url: str, out: Path, profile: Path, height: int) -> None:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--virtual-time-budget={SETTLE_MS}", f"--window-size={WINDOW[0]},{height}",
           f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"{out.relative_to(PROJECT)}  <-  {url}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "ui")
    parser.add_argument("--keep", action="store_true", help="leave the server running (stop it with Ctrl-C)")
    args = parser.parse_args()
    browser = chromium()
    root = Path(tempfile.mkdtemp(prefix="phi3flow-ui-"))
    port = local_server.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": url,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    # the default of an installed project, said explicitly
    env["MLFLOW_EXPERIMENT_NAME"] = settings.DEFAULT_EXPERIMENT_NAME
    server = local_server.spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], root / "server.log", cwd=root, env=env)
    try:
        local_server.wait_until_up(server, f"{url}/health", root / "server.log", 180)
        eval_file = root / "eval.jsonl"
        rows = (PROJECT / settings.BUNDLED_EVAL_FILE).read_text().splitlines()[:EVAL_ROWS]
        eval_file.write_text("\n".join(rows) + "\n")
        print(f"running main on {settings.BUILTIN_TINY} against {url} ...", flush=True)
        subprocess.run([str(BIN / "mlflow"), "run", str(PROJECT), "-P", f"model_id={settings.BUILTIN_TINY}",
                        "-P", f"eval_data={eval_file}", "--env-manager", "local"],
                       check=True, env=env, cwd=root, stdin=subprocess.DEVNULL)

        client = mlflow.MlflowClient(url)
        experiment = client.get_experiment_by_name(settings.DEFAULT_EXPERIMENT_NAME)
        [evaluation] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
        champion = evaluation.data.tags[settings.TAG_CHAMPION]
        name, _, version = champion.rpartition("/")
        run_page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{evaluation.info.run_id}"
        pages = {  # file: (page, window height)
            "runs.png": (f"{url}/#/experiments/{experiment.experiment_id}/runs?{MODE}", 600),
            "evaluate_run.png": (f"{run_page}?{MODE}", 1500),  # tall enough for the description
            "evaluate_traces.png": (f"{run_page}/traces?{MODE}", WINDOW[1]),
            "comparison.png": (f"{run_page}/artifacts/comparison/comparison.md?{MODE}", 750),
            "champion_version.png": (f"{url}/#/models/{name}/versions/{version}?{MODE}", 800),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for file, (page, height) in pages.items():
            profile = root / f"chromium-{file}"  # a new empty profile per shot: nothing cached in between
            screenshot(browser, page, args.out / file, profile, height)
        if args.keep:
            print(f"the server is up at {url}; Ctrl-C stops it", flush=True)
            server.wait()
    finally:
        local_server.stop(server)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
