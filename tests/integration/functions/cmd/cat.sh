#!/bin/sh
# Echoes the event: stdin to stdout.
exec cat
