"""Meta-Dataset episode pipeline (tf.data + numpy; never imports JAX).

Public API:

    import meta_dataset_pipeline as mdp
    spec = mdp.load_dataset_spec(records_dir)
    cfg = mdp.EpisodeDescriptionConfig()          # variable way and shot
    ds = mdp.make_one_source_episode_dataset(spec, mdp.Split.TRAIN, cfg,
                                             image_size=84, seed=0)
    for episode in ds.as_numpy_iterator(): ...

See `pipeline.py` for the episode dict, `sampling.py` for the sampler,
`padding.py` for the padding policy, `dataset_spec.py` for specs and
`simclr.py` for SimCLR episodes and augmentations.
"""

from meta_dataset_pipeline.dataset_spec import BiLevelDatasetSpecification
from meta_dataset_pipeline.dataset_spec import DatasetSpecification
from meta_dataset_pipeline.dataset_spec import HierarchicalDatasetSpecification
from meta_dataset_pipeline.dataset_spec import load_dataset_spec
from meta_dataset_pipeline.dataset_spec import Split
from meta_dataset_pipeline.dataset_spec import SpecError
from meta_dataset_pipeline.decoder import DataAugmentation
from meta_dataset_pipeline.padding import EpisodeBuckets
from meta_dataset_pipeline.pipeline import episode_buckets
from meta_dataset_pipeline.pipeline import EPISODE_KEYS
from meta_dataset_pipeline.pipeline import make_batch_dataset
from meta_dataset_pipeline.pipeline import make_multisource_episode_dataset
from meta_dataset_pipeline.pipeline import make_one_source_episode_dataset
from meta_dataset_pipeline.reader import RecordError
from meta_dataset_pipeline.sampling import EpisodeDescription
from meta_dataset_pipeline.sampling import EpisodeDescriptionConfig
from meta_dataset_pipeline.sampling import EpisodeDescriptionSampler
from meta_dataset_pipeline.sampling import max_ways
from meta_dataset_pipeline.simclr import augmentation_by_name
from meta_dataset_pipeline.simclr import BOHB_AUGMENTATION
from meta_dataset_pipeline.simclr import SIMCLR_AUGMENTATION
from meta_dataset_pipeline.simclr import SimCLRAugmentation
