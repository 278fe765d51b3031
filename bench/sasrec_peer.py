"""The SASRec peer (rectools 0.19's `SASRecModel`), run by `bench/peers.py` in its own
interpreter: rectools requires numpy < 2, which the service does not run on.

    .venv-sasrec/bin/python bench/sasrec_peer.py --train TRAIN.csv --users USERS.txt \
        --k 100 --out TOP.json [--epochs N]

`scripts/sasrec-env.sh` makes that interpreter. Reads the training interactions (CSV with
user_id, item_id, timestamp), fits SASRec on each user's sequence, and writes each listed
user's top-k items (training items left out) as JSON {user id: [item ids, best first]}.

The configuration is the one the MovieLens-100K leave-last-out figure was published with
(64 dims, 2 blocks, 2 heads, the latest 50 items, dropout 0.2, softmax loss over the
catalogue, 100 epochs, seed 0); no tuning beyond it.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import SASRecModel

log = logging.getLogger("sasrec_peer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--users", type=Path, required=True)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    frame = pd.read_csv(args.train)
    interactions = pd.DataFrame(
        {
            Columns.User: frame["user_id"].astype(str),
            Columns.Item: frame["item_id"].astype(str),
            Columns.Weight: 1.0,
            Columns.Datetime: pd.to_datetime(frame["timestamp"], unit="s"),
        }
    )
    dataset = Dataset.construct(interactions)
    model = SASRecModel(
        n_factors=64,
        n_blocks=2,
        n_heads=2,
        session_max_len=50,
        dropout_rate=0.2,
        epochs=args.epochs,
        deterministic=True,
        verbose=1,  # lightning's progress bar: rate and time left per epoch
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    log.info(
        "SASRec on %d interactions of %d users, %d epochs",
        len(frame),
        frame["user_id"].nunique(),
        args.epochs,
    )
    model.fit(dataset)
    log.info("trained in %.1f s", time.perf_counter() - started)
    users = [line.strip() for line in args.users.read_text().splitlines() if line.strip()]
    known = [u for u in users if u in set(interactions[Columns.User])]
    found = model.recommend(users=known, dataset=dataset, k=args.k, filter_viewed=True)
    found = found.sort_values([Columns.User, Columns.Rank])
    top = found.groupby(Columns.User)[Columns.Item].agg(list)
    args.out.write_text(json.dumps({user: [int(i) for i in items] for user, items in top.items()}))
    log.info("wrote the top %d of %d users to %s", args.k, len(top), args.out)


if __name__ == "__main__":
    main()
