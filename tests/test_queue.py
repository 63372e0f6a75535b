import pytest
import torch

from ascl_hf.queue import KeyQueue


def batch(start, n, dim=2):
    """Keys whose first column is their global index, to read the FIFO order back."""
    keys = torch.zeros(n, dim)
    keys[:, 0] = torch.arange(start, start + n, dtype=torch.float)
    return keys


def contents(queue):
    """Indices held by the queue, oldest first."""
    order = (queue.pointer + torch.arange(queue.size)) % queue.size
    return queue.keys[order, 0].long().tolist()


def test_wraps_around_with_batches_that_do_not_divide_the_size():
    queue = KeyQueue(size=10, dim=2)
    seen = 0
    for n in (3, 4, 3, 5, 7):
        queue.enqueue(batch(seen, n))
        seen += n
    assert contents(queue) == list(range(seen - 10, seen))
    assert int(queue.pointer) == seen % 10


def test_batch_larger_than_the_queue_keeps_the_newest_keys():
    queue = KeyQueue(size=4, dim=2)
    queue.enqueue(batch(0, 3))
    queue.enqueue(batch(3, 9))
    assert contents(queue) == [8, 9, 10, 11]
    assert int(queue.pointer) == 12 % 4


@pytest.mark.parametrize("n", [1, 4, 5])
def test_fresh_queue_is_unit_norm_and_enqueue_is_exact(n):
    queue = KeyQueue(size=5, dim=3)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(5))
    new = torch.randn(n, 3)
    queue.enqueue(new)
    torch.testing.assert_close(queue.keys[:n], new)


def test_queue_state_is_saved():
    queue = KeyQueue(size=6, dim=2)
    queue.enqueue(batch(0, 4))
    restored = KeyQueue(size=6, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and int(restored.pointer) == 4
