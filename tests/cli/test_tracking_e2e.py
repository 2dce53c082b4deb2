"""tracker=tensorboard in a real Flower run: the event files hold every round's metrics."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_tensorboard_events_of_a_flower_run(cli_runs):
    acc = EventAccumulator(str(cli_runs["homo"] / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"server/accuracy", "server/loss", "bytes_up", "round_time_s"} <= set(tags)
    assert [e.step for e in acc.Scalars("server/loss")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("bytes_up")] == [1, 2]
