"""What the book's notebooks share: data sets, small models, training loops and plots.

A reader can skip this package on a first read: each chapter shows the idea, and the plumbing it
needs in more than one place lives here (the d2l pattern).
"""
