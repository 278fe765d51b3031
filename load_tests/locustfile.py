"""Load for POST /v1/recommend: a Zipf mix of known users plus some cold ones; after a share
of the answers, the frontend's feedback to POST /v1/events (impressions of what was shown,
a click on one of them).

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 30s

Known user ids come from the served artifact when RECSYS_ARTIFACTS points at it;
otherwise every user is cold (popular-items answers).
"""

import os
import random

import numpy as np
from locust import HttpUser, between, task

COLD_SHARE = float(os.environ.get("RECSYS_LOAD_COLD_SHARE", "0.1"))
FEEDBACK_SHARE = float(os.environ.get("RECSYS_LOAD_FEEDBACK_SHARE", "0.3"))
ZIPF_EXPONENT = 1.2


def known_users() -> np.ndarray:
    path = os.environ.get("RECSYS_ARTIFACTS")
    if not path:
        return np.empty(0, dtype=np.uint64)
    from service.artifacts import resolve_version
    from service.history import UserHistories

    return UserHistories.load(resolve_version(path) / "histories.safetensors").user_ids


USERS = known_users()
RANK_WEIGHTS = (1.0 / np.arange(1, len(USERS) + 1) ** ZIPF_EXPONENT) if len(USERS) else None


class RecommendUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def pick_user(self) -> int:
        if RANK_WEIGHTS is None or random.random() < COLD_SHARE:
            return random.getrandbits(63)
        return int(random.choices(USERS, weights=RANK_WEIGHTS)[0])

    @task
    def recommend(self) -> None:
        body = {"user_id": self.pick_user(), "k": 10, "context": {"hour": random.randrange(24)}}
        with self.client.post("/v1/recommend", json=body, name="/v1/recommend", catch_response=True) as response:
            if response.status_code != 200 or len(response.json()["items"]) != 10:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            shown = [item["item_id"] for item in response.json()["items"]]
        if random.random() < FEEDBACK_SHARE:
            self.feedback(body["user_id"], shown)

    def feedback(self, user_id: int, shown: list[int]) -> None:
        events = [{"user_id": user_id, "item_id": item, "type": "impression"} for item in shown]
        events.append({"user_id": user_id, "item_id": random.choice(shown), "type": "click"})
        with self.client.post("/v1/events", json={"events": events}, name="/v1/events", catch_response=True) as response:
            if response.status_code != 202 or response.json()["accepted"] != len(events):
                response.failure(f"status {response.status_code}: {response.text[:200]}")
