"""cryptoflow: records crypto futures order books as hive-partitioned Parquet."""

__version__ = "0.1.0"
