"""Helpers of the SemiSegLA Slicer module.

Everything here except ``nodes`` is plain Python: no ``slicer``, ``qt``, ``vtk`` or ``torch`` import, so
pytest covers it directly. ``nodes`` is the only place that calls ``slicer``; it imports it inside its
functions, and the tests give it an explicit stand-in (Testing/slicer_fake).
"""
