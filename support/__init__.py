"""Support code for the scripts: start-up, files, command lines, file formats, data, training, the demo world."""
