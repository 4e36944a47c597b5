"""Killing the endpoint (SIGKILL) in the middle of a job and starting it again loses nothing."""

from __future__ import annotations

import os
import signal

from tests.endpoint.conftest import Api, WebhookListener, start_endpoint


def test_endpoint_killed_mid_job_loses_no_queued_running_or_finished_job(tmp_path):
    endpoint = start_endpoint(tmp_path)
    webhooks = WebhookListener()
    try:
        api = Api(endpoint)
        finished = api.run({"steps": 1, "echo": "before"})
        finished_status = api.wait(finished)
        assert finished_status["status"] == "COMPLETED"

        # the running job waits for a child process, so it outlasts the restart however slow that is
        running = api.run(
            {"steps": 2, "step_s": 0.1, "mode": "child", "echo": "across"}, webhook=webhooks.url("/running")
        )
        queued = api.run({"steps": 1, "echo": "queued"}, webhook=webhooks.url("/queued"))
        seen = api.collect_stream(running, lambda items: any("child_pid" in i for i in items))
        child_pid = next(i["child_pid"] for i in seen if "child_pid" in i)
        assert api.status(queued)["status"] == "IN_QUEUE"

        port = endpoint.port
        os.killpg(endpoint.proc.pid, signal.SIGKILL)
        endpoint.proc.wait()
        endpoint.restart()
        assert endpoint.port == port  # the worker's URLs still point here

        assert api.status(finished) == finished_status
        assert api.status(running)["status"] == "IN_PROGRESS"
        os.kill(child_pid, signal.SIGTERM)  # now the job may finish, reporting to the restarted endpoint
        done = api.wait(running)
        assert done["status"] == "COMPLETED"
        assert [o["step"] for o in done["output"] if "step" in o] == [1, 2]
        assert done["output"][-1] == {"result": {"echo": "across", "s3": False}}
        assert api.wait(queued)["output"][-1]["result"]["echo"] == "queued"
        assert webhooks.wait_calls("/running", 1) == [done]
        assert webhooks.wait_calls("/queued", 1)[0]["status"] == "COMPLETED"
    finally:
        endpoint.stop()
        webhooks.server.shutdown()
