"""Runs glue.py like the command line does, on as many logical CPU devices as GLUE_TEST_CPUS
says: a stand-in for a multi-GPU machine in the tf.distribute tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402

import glue  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * int(os.environ.get("GLUE_TEST_CPUS", "2")))

if __name__ == "__main__":
    app.run(glue.main)
