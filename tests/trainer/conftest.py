import pytest

from trainer_helpers import arithmetic_chat, write_jsonl


@pytest.fixture
def chat_dataset(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_chat(48))
