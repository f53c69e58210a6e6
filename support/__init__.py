"""Support code for the scripts beside this folder: start-up, files, command lines, data, training, the demo builder."""
