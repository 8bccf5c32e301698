//! One table of results (experiments, a stage's instances, an export) and its renderings:
//! aligned text for a terminal, Markdown, CSV and JSON records, so every command that prints
//! rows prints them the same way.

use serde_json::{Map, Value};

/// A cell: empty (not recorded), text or a number.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Empty,
    Text(String),
    Number(f64),
}

impl Cell {
    /// A JSON value as a cell: numbers stay numbers, strings stay text, anything else is its
    /// compact JSON.
    pub fn from_json(v: &Value) -> Cell {
        match v {
            Value::Null => Cell::Empty,
            Value::Number(n) => n.as_f64().map(Cell::Number).unwrap_or(Cell::Empty),
            Value::String(s) => Cell::Text(s.clone()),
            Value::Bool(b) => Cell::Text(b.to_string()),
            other => Cell::Text(other.to_string()),
        }
    }

    /// For a person: numbers shortened to 6 significant digits, integers without a decimal
    /// part, empty cells as `–`.
    pub fn display(&self) -> String {
        match self {
            Cell::Empty => "–".into(),
            Cell::Text(s) => s.clone(),
            Cell::Number(v) => format_number(*v),
        }
    }

    /// For a machine (CSV): numbers in full precision, empty cells empty.
    fn exact(&self) -> String {
        match self {
            Cell::Empty => String::new(),
            Cell::Text(s) => s.clone(),
            Cell::Number(v) if is_integer(*v) => format!("{v:.0}"),
            Cell::Number(v) => format!("{v}"),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Empty => Value::Null,
            Cell::Text(s) => Value::String(s.clone()),
            Cell::Number(v) if is_integer(*v) => Value::from(*v as i64),
            Cell::Number(v) => serde_json::Number::from_f64(*v)
                .map(Value::Number)
                .unwrap_or(Value::Null),
        }
    }

    /// Orders numbers by value, then text, with empty cells last.
    pub fn compare(&self, other: &Cell) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self, other) {
            (Cell::Number(a), Cell::Number(b)) => a.total_cmp(b),
            (Cell::Number(_), _) => Ordering::Less,
            (_, Cell::Number(_)) => Ordering::Greater,
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Text(_), Cell::Empty) => Ordering::Less,
            (Cell::Empty, Cell::Text(_)) => Ordering::Greater,
            (Cell::Empty, Cell::Empty) => Ordering::Equal,
        }
    }
}

fn is_integer(v: f64) -> bool {
    v.is_finite() && v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15
}

/// A metric or param value for a person: integers as integers (`295`, not `295.0`), other
/// values with 6 significant digits, very small or large ones in scientific notation.
pub fn format_number(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if is_integer(v) && v.abs() < 1e12 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if !(1e-4..1e9).contains(&a) {
        return format!("{v:.4e}");
    }
    let digits = (5 - a.log10().floor() as i64).clamp(0, 12) as usize;
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// Named columns and rows of cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

/// The ways a table is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// Aligned columns for a terminal.
    Text,
    Markdown,
    Csv,
    /// A JSON list of records (`pandas.read_json(path)` reads it).
    Json,
}

impl Table {
    pub fn new(columns: Vec<String>) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    /// Keeps the columns for which `keep(index)` holds.
    pub fn retain_columns(&mut self, keep: impl Fn(usize) -> bool) {
        let kept: Vec<usize> = (0..self.columns.len()).filter(|&i| keep(i)).collect();
        self.columns = kept.iter().map(|&i| self.columns[i].clone()).collect();
        for row in &mut self.rows {
            *row = kept.iter().map(|&i| row[i].clone()).collect();
        }
    }

    /// Whether column `i` holds the same value in every row.
    pub fn is_constant(&self, i: usize) -> bool {
        self.rows.windows(2).all(|w| w[0][i] == w[1][i])
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Sorts rows by column `i` (numbers by value; empty cells last either way).
    pub fn sort_by_column(&mut self, i: usize, descending: bool) {
        self.rows.sort_by(|a, b| {
            let empty = (matches!(a[i], Cell::Empty), matches!(b[i], Cell::Empty));
            match empty {
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                _ if descending => b[i].compare(&a[i]),
                _ => a[i].compare(&b[i]),
            }
        });
    }

    pub fn render(&self, format: TableFormat) -> String {
        match format {
            TableFormat::Text => self.text(),
            TableFormat::Markdown => self.markdown(),
            TableFormat::Csv => self.csv(),
            TableFormat::Json => {
                let mut s = serde_json::to_string_pretty(&self.records()).unwrap_or_default();
                s.push('\n');
                s
            }
        }
    }

    /// The rows as JSON objects keyed by column name.
    pub fn records(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|row| {
                let m: Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| (c.clone(), v.json()))
                    .collect();
                Value::Object(m)
            })
            .collect()
    }

    fn text(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::display).collect())
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.columns[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .iter()
                    .all(|r| matches!(r[i], Cell::Number(_) | Cell::Empty))
            })
            .collect();
        let line = |values: &[String]| -> String {
            let parts: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let pad = widths[i].saturating_sub(v.chars().count());
                    if numeric[i] {
                        format!("{}{v}", " ".repeat(pad))
                    } else {
                        format!("{v}{}", " ".repeat(pad))
                    }
                })
                .collect();
            format!("{}\n", parts.join("  ").trim_end())
        };
        let mut out = line(&self.columns);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&line(&rule));
        for r in &cells {
            out.push_str(&line(r));
        }
        out
    }

    fn markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = format!(
            "| {} |\n|{}|\n",
            self.columns
                .iter()
                .map(|c| esc(c))
                .collect::<Vec<_>>()
                .join(" | "),
            self.columns
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|c| esc(&c.display())).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }

    fn csv(&self) -> String {
        let field = |s: &str| {
            if s.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = String::new();
        let header: Vec<String> = self.columns.iter().map(|c| field(c)).collect();
        out.push_str(&header.join(","));
        out.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|c| field(&c.exact())).collect();
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

impl Table {
    /// Writes the table as a Parquet file (`pandas.read_parquet(path)`): a column of numbers
    /// is INT64 when every value is an integer and DOUBLE otherwise, any other column is UTF-8
    /// text; empty cells are nulls. One row group, uncompressed (readers need no codec).
    pub fn write_parquet(&self, path: &std::path::Path) -> Result<(), ParquetError> {
        use parquet::basic::{LogicalType, Repetition, Type as Physical};
        use parquet::column::writer::ColumnWriter;
        use parquet::data_type::ByteArray;
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::types::Type;
        use std::sync::Arc;

        #[derive(Clone, Copy)]
        enum Kind {
            Int,
            Double,
            Text,
        }
        let kinds: Vec<Kind> = (0..self.columns.len())
            .map(|i| {
                let cells = || self.rows.iter().map(move |r| &r[i]);
                if cells()
                    .all(|c| matches!(c, Cell::Number(v) if is_integer(*v)) || *c == Cell::Empty)
                {
                    Kind::Int
                } else if cells().all(|c| matches!(c, Cell::Number(_) | Cell::Empty)) {
                    Kind::Double
                } else {
                    Kind::Text
                }
            })
            .collect();
        let fields = self
            .columns
            .iter()
            .zip(&kinds)
            .map(|(name, kind)| {
                let builder = match kind {
                    Kind::Int => Type::primitive_type_builder(name, Physical::INT64),
                    Kind::Double => Type::primitive_type_builder(name, Physical::DOUBLE),
                    Kind::Text => Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
                        .with_logical_type(Some(LogicalType::String)),
                };
                builder
                    .with_repetition(Repetition::OPTIONAL)
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schema = Arc::new(
            Type::group_type_builder("engine_export")
                .with_fields(fields)
                .build()?,
        );
        let file = std::fs::File::create(path).map_err(ParquetError::Io)?;
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(file, schema, props)?;
        let mut group = writer.next_row_group()?;
        let mut i = 0;
        while let Some(mut column) = group.next_column()? {
            let cells: Vec<&Cell> = self.rows.iter().map(|r| &r[i]).collect();
            let levels: Vec<i16> = cells
                .iter()
                .map(|c| i16::from(**c != Cell::Empty))
                .collect();
            match (column.untyped(), kinds[i]) {
                (ColumnWriter::Int64ColumnWriter(w), Kind::Int) => {
                    let values: Vec<i64> = cells
                        .iter()
                        .filter_map(|c| match c {
                            Cell::Number(v) => Some(*v as i64),
                            _ => None,
                        })
                        .collect();
                    w.write_batch(&values, Some(&levels), None)?;
                }
                (ColumnWriter::DoubleColumnWriter(w), Kind::Double) => {
                    let values: Vec<f64> = cells
                        .iter()
                        .filter_map(|c| match c {
                            Cell::Number(v) => Some(*v),
                            _ => None,
                        })
                        .collect();
                    w.write_batch(&values, Some(&levels), None)?;
                }
                (ColumnWriter::ByteArrayColumnWriter(w), Kind::Text) => {
                    let values: Vec<ByteArray> = cells
                        .iter()
                        .filter(|c| ***c != Cell::Empty)
                        .map(|c| ByteArray::from(c.exact().into_bytes()))
                        .collect();
                    w.write_batch(&values, Some(&levels), None)?;
                }
                _ => unreachable!("each column's writer follows its declared type"),
            }
            column.close()?;
            i += 1;
        }
        group.close()?;
        writer.close()?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
}

/// A JSON value's leaves by dotted path (`optimizer.kind`), for params as columns. Arrays are
/// leaves.
pub fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(format_number(295.0), "295");
        assert_eq!(format_number(-3.0), "-3");
        assert_eq!(format_number(0.1), "0.1");
        assert_eq!(format_number(0.912345678), "0.912346");
        assert_eq!(format_number(1234.56789), "1234.57");
        assert_eq!(format_number(2.5e-7), "2.5000e-7");
        assert_eq!(format_number(f64::NAN), "NaN");
        assert_eq!(format_number(-0.0000001), "-1.0000e-7");
    }

    fn sample() -> Table {
        let mut t = Table::new(vec!["name".into(), "lr".into(), "acc".into()]);
        t.rows.push(vec![
            Cell::Text("a".into()),
            Cell::Number(0.1),
            Cell::Number(0.5),
        ]);
        t.rows.push(vec![
            Cell::Text("b, \"c\"".into()),
            Cell::Number(0.1),
            Cell::Empty,
        ]);
        t.rows.push(vec![
            Cell::Text("d".into()),
            Cell::Number(0.1),
            Cell::Number(0.7),
        ]);
        t
    }

    #[test]
    fn renderings() {
        let t = sample();
        let csv = t.render(TableFormat::Csv);
        assert_eq!(
            csv,
            "name,lr,acc\na,0.1,0.5\n\"b, \"\"c\"\"\",0.1,\nd,0.1,0.7\n"
        );
        let md = t.render(TableFormat::Markdown);
        assert!(
            md.starts_with("| name | lr | acc |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(md.contains("| – |"), "{md}");
        let json: Value = serde_json::from_str(&t.render(TableFormat::Json)).unwrap();
        assert_eq!(json[1], json!({"name": "b, \"c\"", "lr": 0.1, "acc": null}));
        let text = t.render(TableFormat::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "name     lr  acc");
        assert_eq!(lines[3], "b, \"c\"  0.1    –");
    }

    #[test]
    fn constant_columns_and_sorting() {
        let mut t = sample();
        assert!(t.is_constant(1));
        assert!(!t.is_constant(2));
        t.sort_by_column(2, true);
        let names: Vec<String> = t.rows.iter().map(|r| r[0].display()).collect();
        assert_eq!(names, ["d", "a", "b, \"c\""]);
        t.retain_columns(|i| i != 1);
        assert_eq!(t.columns, ["name", "acc"]);
    }

    #[test]
    fn parquet_round_trips() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let mut t = sample();
        t.columns.push("n".into());
        for (i, r) in t.rows.iter_mut().enumerate() {
            r.push(Cell::Number(i as f64));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        t.write_parquet(&path).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
        let rows: Vec<String> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap().to_string())
            .collect();
        assert_eq!(rows[0], "{name: \"a\", lr: 0.1, acc: 0.5, n: 0}");
        assert_eq!(rows[1], "{name: \"b, \"c\"\", lr: 0.1, acc: null, n: 1}");
    }

    #[test]
    fn flatten_gives_dotted_leaves() {
        let mut out = Vec::new();
        flatten(
            "vars",
            &json!({"lr": 0.1, "opt": {"kind": "sgd"}, "l": [1, 2]}),
            &mut out,
        );
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        // Keys keep the document's order (serde_json preserves it).
        assert_eq!(keys, ["vars.lr", "vars.opt.kind", "vars.l"]);
    }
}
