import numpy as np

from service.data.feature_space import FeatureSpace, IdVocabulary


def test_vocabulary_maps_raw_ids_to_rows_and_unknown_to_zero():
    vocab = IdVocabulary(np.array([2**64 - 1, 5, 5, 2**63], dtype=np.uint64))
    assert len(vocab) == 3 and vocab.size == 4
    rows = vocab.rows(np.array([5, 2**63, 2**64 - 1, 6, 0], dtype=np.uint64))
    assert rows.tolist() == [1, 2, 3, 0, 0]


def test_feature_space_round_trips(tmp_path, tiny_dataset):
    space = FeatureSpace.build(tiny_dataset)
    space.save(tmp_path)
    loaded = FeatureSpace.load(tmp_path)
    np.testing.assert_array_equal(loaded.items.ids, space.items.ids)
    np.testing.assert_array_equal(loaded.item_attributes, space.item_attributes)
    assert loaded.attribute_values == space.attribute_values
    # every item of the synthetic catalog has exactly one category attribute
    assert ((space.item_attributes[1:] > 0).sum(1) == 1).all()
    assert space.item_counts.sum() == len(tiny_dataset.interactions)
