# pick.awk: of numbers sorted ascending, one a line, prints the median
# (fn=med, the mean of the middle two for an even count), the minimum
# (fn=min) or the maximum (fn=max); NA when there are none. Shared by the
# bench-*.sh reports.
{ a[NR] = $1 }
END {
    if (NR == 0) { print "NA"; exit }
    if (fn == "min") print a[1]
    else if (fn == "max") print a[NR]
    else if (NR % 2) print a[(NR + 1) / 2]
    else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2
}
