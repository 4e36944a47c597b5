"""Preprocessing: datasets → prompt strategies → masked, packed rows in a fingerprinted cache.

sources.py      local files/folders, save_to_disk folders, Hub, s3://, http(s):// + content ids
strategies/     prompt strategies by name (closed registry): rows → input_ids + labels
rows.py         length policy, deduplication, shuffle, eval split (Arrow tables)
packing.py      first-fit-decreasing bins, position_ids restarting per sample
cache.py        fingerprint, build lock, atomic publish, load_prepared(cache_dir)
pipeline.py     prepare(cfg): the whole stage, top to bottom
command.py      `ftw preprocess CONFIG`;  __main__.py: the child `python -m worker.data CONFIG_JSON --output FILE`
prepared.py     PreparedCache: the preprocess stage's typed output
"""
